"""RandAugment exactly as timm 0.6.5 defines the policy string, batched on the images' device.

What timm 0.6.5 does (``timm/data/auto_augment.py``; OFA-KD and PAT train with ``rand-m9-mstd0.5-inc1``):

- Policy string ``rand-`` then dash-separated parts, each a key followed by a value that starts at its first digit:
  ``m`` int magnitude (default 10), ``n`` int ops per image (default 2), ``mstd`` float std of the magnitude noise
  (> 100 means uniform in [0, m]), ``mmax`` int upper clip of the magnitude (default, and for 0, 10), ``inc`` the
  "increasing" op set, ``w0`` the weighted op choice (no replacement).
- Per image, ``n`` ops drawn uniformly *with* replacement (``numpy.random.choice``); each op is applied with
  probability 0.5; an applied op draws its magnitude from N(m, mstd), clips it to [0, mmax] and maps
  ``level = magnitude / 10`` to its argument: rotate 30 deg, shear 0.3, translate 0.45 of the image side, enhance
  factor 0.1 + 1.8 level (plain) or max(0.1, 1 +- 0.9 level) (increasing), posterize int(4 level) bits (plain) or
  4 - int(4 level) (increasing), solarize threshold int(256 level) (plain) or 256 - int(256 level) (increasing),
  SolarizeAdd int(110 level) below 128. Rotate, shear, translate and the increasing enhance ops negate their
  argument with probability 0.5.
- Geometric ops are PIL's ``Image.transform(AFFINE)`` (rotate: ``Image.rotate`` about (w/2, h/2)), filled with
  hparams ``img_mean`` (``create_transform``: round(255 * dataset mean)), resampled bilinear or bicubic drawn per op
  call when the train interpolation is ``random``, else the train interpolation.
- Colour ops are PIL's ``ImageOps`` / ``ImageEnhance`` on uint8 images.

How it is computed here: one draw of every random choice for the whole batch, on the host (torch's global CPU RNG,
or ``generator``), then for each op slot the images are grouped by the op they drew and every group is processed at
once. The grouping is planned on the host from those draws and the per-image arguments reach the images' device in
one non-blocking copy, so a batch makes no host synchronisation on a GPU (``tests/test_host_sync.py``). The
geometric ops of a slot share one sampling pass per resampling filter and axis (rows only for ShearX/TranslateXRel,
columns only for ShearY/TranslateYRel, 2-D for Rotate). The sampler is PIL's: output pixel
centres mapped by the affine matrix, points outside [0, W) x [0, H) take the fill colour, clamped taps inside,
bilinear ``a + (b - a) d`` and PIL's bicubic (a = -1 cubic convolution), computed in float64 and truncated to uint8
as PIL does. Colour ops reproduce PIL's integer arithmetic: ``L = (19595 R + 38470 G + 7471 B + 2**15) >> 16``,
blends in float32 truncated and clipped, Contrast's rounded L mean, Sharpness' 3x3 SMOOTH kernel with the border
kept, AutoContrast's and Equalize's per-channel lookup tables.

Where timm 1.0.31 (installed) or current Pillow differ, 0.6.5 is followed: posterize to 0 (or fewer) bits is a black
image (the Pillow of 0.6.5's day; Pillow >= 10 raises), solarize thresholds and SolarizeAdd amounts are not clamped
(1.0.31 clamps them, which only matters with mmax > 10), ``w0`` is 0.6.5's weighted choice (1.0.31 removed the key).

Deliberate differences from timm 0.6.5, each said where it is coded:

- Inputs are rounded to integers in [0, 255] first (timm's images are uint8 PIL images); outputs are integer-valued.
- A part without a digit, or ``inc0``, is an error here; 0.6.5 silently skips the former and reads ``inc0`` as the
  increasing set (``bool('0')``) where timm >= 0.9 reads the plain set.
- ``p`` is accepted (timm >= 0.9's key; 0.6.5 asserts on it).

Measured against timm's own ops on the installed Pillow (tests/test_randaugment.py; tolerance there: at most 0.1 %
of the pixels may differ, colour ops by at most 1, geometric ops with a mean difference <= 0.05): on CPU every op
equals timm's on every pixel, at magnitudes 0-10, both signs, both resamplings, grey and RGB, and whole policies
replayed through timm's ops equal the batched result. The float64 sampler is written for the GPU; on a CPU core it
is slower than timm's PIL ops, which the per-image DataLoader path keeps using.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from hkdbench.benchmark.data.transfer import to_device

LEVEL_DENOM = 10.0  # timm: magnitude M means level M / 10 of each op's range

PLAIN_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
             "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# timm 0.6.5 _RAND_CHOICE_WEIGHTS_0 ('w0'), by position in the op list (0.6.5 indexes them by the plain names even
# when 'inc' picks the increasing ops, so position is what counts)
CHOICE_WEIGHTS_0 = (0.025, 0.005, 0.0, 0.3, 0.0, 0.005, 0.005, 0.025, 0.005, 0.005, 0.025, 0.2, 0.2, 0.1, 0.1)
TRANSLATE_PCT = 0.45  # timm's hparams default for TranslateXRel / TranslateYRel
INTERPOLATIONS = ("bilinear", "bicubic", "random")
_KEYS = ("m", "n", "mstd", "mmax", "inc", "w", "p")


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment policy string."""
    num_ops: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0         # 0: fixed magnitude; inf: uniform in [0, magnitude]
    magnitude_max: float = LEVEL_DENOM
    prob: float = 0.5
    increasing: bool = False
    weighted: bool = False             # 'w0': timm 0.6.5's weighted op choice, without replacement

    def __post_init__(self):
        allowed = {"num_ops": (self.num_ops >= 0, ">= 0"), "magnitude": (self.magnitude >= 0, ">= 0"),
                   "magnitude_std": (self.magnitude_std >= 0, ">= 0 (inf: uniform)"),
                   "magnitude_max": (self.magnitude_max > 0, "> 0"), "prob": (0 <= self.prob <= 1, "in [0, 1]")}
        for field, (ok, what) in allowed.items():
            if not ok:
                raise ValueError(f"RandAugmentSpec.{field} must be {what}, got {getattr(self, field)}")

    @property
    def op_names(self) -> Tuple[str, ...]:
        return INCREASING_OPS if self.increasing else PLAIN_OPS


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """Parses 'rand-m9-mstd0.5-inc1' and the other keys as timm 0.6.5's rand_augment_transform does."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment policy {spec!r} must start with 'rand'")
    fields: Dict[str, object] = {}
    for part in parts[1:]:
        key, value = _split_part(spec, part)
        fields.update(_parse_value(spec, part, key, value))
    parsed = RandAugmentSpec(**fields)
    if parsed.weighted and parsed.num_ops > sum(w > 0 for w in CHOICE_WEIGHTS_0):
        raise ValueError(f"RandAugment policy {spec!r}: 'w0' draws ops without replacement, so n must be <= "
                         f"{sum(w > 0 for w in CHOICE_WEIGHTS_0)}")
    return parsed


def _split_part(spec: str, part: str) -> Tuple[str, str]:
    pieces = re.split(r"(\d.*)", part)  # timm's split: the key, then everything from the first digit
    if len(pieces) < 2 or pieces[0] not in _KEYS:
        # timm 0.6.5 skips a part without a digit and asserts on an unknown key; both are errors here
        raise ValueError(f"RandAugment policy {spec!r}: unknown part {part!r}; allowed parts are a key among "
                         f"{', '.join(_KEYS)} followed by its number, e.g. 'rand-m9-n2-mstd0.5-inc1'")
    return pieces[0], pieces[1]


def _parse_value(spec: str, part: str, key: str, value: str) -> Dict[str, object]:
    try:
        if key == "m":
            return {"magnitude": float(int(value))}  # 0.6.5: int(); 'm9.5' is an error there too
        if key == "n":
            return {"num_ops": int(value)}
        if key == "mstd":
            std = float(value)
            return {"magnitude_std": math.inf if std > 100 else std}
        if key == "mmax":
            return {"magnitude_max": float(int(value) or LEVEL_DENOM)}  # 0.6.5: 'magnitude_max or 10'
        if key == "inc":
            if int(value) == 0:
                # 0.6.5 reads any 'incN' as the increasing set (bool of the string), timm >= 0.9 reads inc0 as plain
                raise ValueError("inc0 is read differently by timm 0.6.5 (increasing) and timm >= 0.9 (plain)")
            return {"increasing": True}
        if key == "w":
            if int(value) != 0:
                raise ValueError("timm 0.6.5 has only weight set 0")
            return {"weighted": True}
        prob = float(value)
        if not 0.0 <= prob <= 1.0:
            raise ValueError("p must be in [0, 1]")
        return {"prob": prob}
    except ValueError as err:
        raise ValueError(f"RandAugment policy {spec!r}: bad part {part!r} ({err}); allowed: m<int>, n<int>, "
                         "mstd<float>, mmax<int>, inc1, w0, p<float in [0, 1]>") from None


def fill_from_mean(mean: Sequence[float]) -> Tuple[int, ...]:
    """The geometric ops' fill as timm's create_transform sets hparams img_mean: round(255 * m), at most 255."""
    return tuple(min(255, round(255 * m)) for m in mean)


class RandAugmentDraws(NamedTuple):
    """Every random choice of one batch, (B, num_ops) each; the magnitude is already clipped."""
    op: torch.Tensor          # int64 index into the spec's op list
    applied: torch.Tensor     # bool
    magnitude: torch.Tensor   # float64
    negate: torch.Tensor      # bool: the symmetric ops take the negative argument
    bicubic: torch.Tensor     # bool: geometric ops resample bicubic (else bilinear)


class BatchRandAugment:
    """timm 0.6.5's RandAugment on a float (B, C, H, W) batch of 0-255 values, C = 1 or 3, on any device."""

    def __init__(self, spec: Union[str, RandAugmentSpec], fill: Sequence[float], interpolation: str = "random"):
        self.spec = parse_rand_augment(spec) if isinstance(spec, str) else spec
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"RandAugment interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {interpolation!r}")
        self.fill = _check_fill(fill)
        self.interpolation = interpolation

    def __repr__(self) -> str:
        return f"BatchRandAugment({self.spec}, fill={self.fill}, interpolation={self.interpolation!r})"

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The batch augmented with choices drawn on the host (torch's global CPU RNG, or ``generator``'s device):
        host draws let the grouping be planned without reading the images' device."""
        _check_images(images)
        device = generator.device if generator is not None else "cpu"
        return self.apply(images, self.draw(images.shape[0], device, generator))

    def draw(self, batch_size: int, device: Union[str, torch.device] = "cpu",
             generator: Optional[torch.Generator] = None) -> RandAugmentDraws:
        """All random choices for a batch, always in the same order, so a seeded generator replays a batch."""
        spec, shape = self.spec, (batch_size, self.spec.num_ops)
        kw = dict(device=device, generator=generator)
        if spec.weighted:
            weights = torch.tensor(CHOICE_WEIGHTS_0, dtype=torch.float64, device=device)
            op = torch.multinomial(weights.expand(batch_size, -1), spec.num_ops, replacement=False,
                                   generator=generator)
        else:
            op = torch.randint(len(spec.op_names), shape, **kw)
        applied = torch.rand(shape, dtype=torch.float64, **kw) <= spec.prob  # timm skips when random() > prob
        if math.isinf(spec.magnitude_std):
            magnitude = torch.rand(shape, dtype=torch.float64, **kw) * spec.magnitude
        else:
            magnitude = spec.magnitude + spec.magnitude_std * torch.randn(shape, dtype=torch.float64, **kw)
        magnitude = magnitude.clamp(0.0, spec.magnitude_max)
        negate = torch.rand(shape, dtype=torch.float64, **kw) > 0.5  # timm's _randomly_negate
        bicubic = torch.rand(shape, dtype=torch.float64, **kw) < 0.5  # drawn always: one stream layout
        if self.interpolation != "random":
            bicubic = torch.full(shape, self.interpolation == "bicubic", dtype=torch.bool, device=device)
        return RandAugmentDraws(op, applied, magnitude, negate, bicubic)

    def apply(self, images: torch.Tensor, draws: RandAugmentDraws) -> torch.Tensor:
        """The ops of ``draws`` applied slot by slot, each op once for all the images that drew it. The grouping is
        planned on the host from host draws (draws made on a device are read back first: one synchronisation) and
        the per-image arguments reach the images' device in one non-blocking copy."""
        _check_images(images)
        x = _quantize(images)
        fill = _fill_for(self.fill, x)
        groups, order = _plan_groups(draws, self.spec.op_names)
        arguments = torch.stack([_on_host(draws.magnitude).double(), _on_host(draws.negate).double(),
                                 order.double()])  # (3, B, num_ops): whole numbers and float64 travel exactly
        magnitude, negate, order = to_device(arguments, x.device).unbind(0)
        negate, order = negate.bool(), order.long()
        for slot, slot_groups in enumerate(groups):
            x = _apply_slot(x, slot_groups, order[:, slot], magnitude[:, slot], negate[:, slot], fill)
        return x.to(images.dtype)


def apply_op(images: torch.Tensor, name: str, magnitude: torch.Tensor, negate: torch.Tensor,
             fill: Sequence[float], interpolation: str = "bilinear") -> torch.Tensor:
    """One timm op on every image of the batch, with a per-image (B,) magnitude and sign."""
    _check_images(images)
    if name not in _COLOUR_OPS and name not in _GEOMETRIC_OPS:
        known = ", ".join(sorted(_COLOUR_OPS) + sorted(_GEOMETRIC_OPS))
        raise ValueError(f"unknown RandAugment op {name!r}; known: {known}")
    if interpolation not in ("bilinear", "bicubic"):
        raise ValueError(f"apply_op interpolation must be 'bilinear' or 'bicubic', got {interpolation!r}")
    x = _quantize(images)
    magnitude = magnitude.to(device=x.device, dtype=torch.float64)
    negate = negate.to(x.device)
    if name in _COLOUR_OPS:
        out = _COLOUR_OPS[name](x, magnitude, negate)
    else:
        mats = _GEOMETRIC_OPS[name](magnitude, negate, *x.shape[-2:])
        out = _warp(x, mats, interpolation == "bicubic", _fill_for(_check_fill(fill), x), _AXIS[name])
    return out.to(images.dtype)


# ----------------------------------------------------------------------------------------------- batching

class _Group(NamedTuple):
    """The images of one slot that drew the same op and resampling: ``count`` entries of the slot's order from
    ``start`` on."""
    name: str
    bicubic: bool
    start: int
    count: int


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def _plan_groups(draws: RandAugmentDraws, names: Sequence[str]) -> Tuple[List[List[_Group]], torch.Tensor]:
    """Per slot, the images sorted (stably) by the op and resampling they drew, not applied last: the groups along
    that order and the order itself, (B, num_ops) on the host. Computed from the draws' host values, so on a GPU
    no group size is read from the device."""
    ops, applied, bicubic = (_on_host(t).tolist() for t in (draws.op, draws.applied, draws.bicubic))
    batch, slots, skipped = len(ops), draws.op.shape[1], 2 * len(names)
    groups, orders = [], []
    for slot in range(slots):
        keys = [2 * ops[i][slot] + (bicubic[i][slot] and names[ops[i][slot]] in _GEOMETRIC_OPS)
                if applied[i][slot] else skipped for i in range(batch)]
        order = sorted(range(batch), key=keys.__getitem__)  # Python's sort is stable
        slot_groups, start = [], 0
        for key, members in itertools.groupby(order, key=keys.__getitem__):
            count = sum(1 for _ in members)
            if key != skipped:
                slot_groups.append(_Group(names[key // 2], bool(key % 2), start, count))
            start += count
        groups.append(slot_groups)
        orders.append(order)
    return groups, torch.tensor(orders, dtype=torch.int64).reshape(slots, batch).T


def _apply_slot(x, groups: List[_Group], order, magnitude, negate, fill):
    """Runs every group of one slot at once: colour ops in place (the groups are disjoint), the geometric ops in
    one sampling pass per axis and resampling. ``order``, ``magnitude``, ``negate``: the slot's (B,) on the
    device."""
    warps: Dict[Tuple[str, bool], Tuple[list, list]] = {}  # (axis, bicubic) -> (image indices, matrices)
    for group in groups:
        idx = order[group.start:group.start + group.count]
        if group.name in _COLOUR_OPS:
            x[idx] = _COLOUR_OPS[group.name](x[idx], magnitude[idx], negate[idx])
        else:
            indices, mats = warps.setdefault((_AXIS[group.name], group.bicubic), ([], []))
            indices.append(idx)
            mats.append(_GEOMETRIC_OPS[group.name](magnitude[idx], negate[idx], *x.shape[-2:]))
    for (axis, cubic), (indices, mats) in warps.items():  # one sampling pass per axis and resampling
        idx = torch.cat(indices)
        x[idx] = _warp(x[idx], torch.cat(mats), cubic, fill, axis)
    return x


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"RandAugment images must be (B, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}")
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise ValueError(f"RandAugment images must be float (0-255 values) or uint8, got {images.dtype}")


def _check_fill(fill: Sequence[float]) -> Tuple[float, ...]:
    values = tuple(float(v) for v in fill)
    if len(values) not in (1, 3) or not all(0.0 <= v <= 255.0 for v in values):
        raise ValueError(f"RandAugment fill must be 1 or 3 values in [0, 255] (timm: round(255 * dataset mean)), "
                         f"got {tuple(fill)}")
    return values


def _fill_for(fill: Tuple[float, ...], x: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    if len(fill) not in (1, channels):
        raise ValueError(f"RandAugment fill has {len(fill)} values for {channels}-channel images")
    values = fill * channels if len(fill) == 1 else fill
    return to_device(torch.tensor(values, dtype=torch.float64), x.device)


def _quantize(images: torch.Tensor) -> torch.Tensor:
    """float32 integers in [0, 255]: timm's RandAugment works on uint8 PIL images."""
    return images.to(torch.float32).round().clamp(0.0, 255.0)


# ----------------------------------------------------------------------------------------------- level -> argument

def _divide(numerator, denominator) -> torch.Tensor:
    """IEEE division as Python's: torch turns a Python-number operand into a reciprocal multiply (scalar / tensor
    everywhere, tensor / scalar on CUDA), one rounding more, which moves int() and floor() at exact ties."""
    like = numerator if isinstance(numerator, torch.Tensor) else denominator
    as_tensor = lambda v: v if isinstance(v, torch.Tensor) else torch.full_like(like, v)  # noqa: E731
    return torch.div(as_tensor(numerator), as_tensor(denominator))


def _level(magnitude: torch.Tensor) -> torch.Tensor:
    return _divide(magnitude, LEVEL_DENOM)


def _signed(value: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    return torch.where(negate, -value, value)


def _enhance_factor(magnitude: torch.Tensor, negate: torch.Tensor, increasing: bool) -> torch.Tensor:
    if increasing:  # 'no change' is 1.0; away from it increases the effect; kept >= 0.1
        return (1.0 + _signed(_level(magnitude) * 0.9, negate)).clamp(min=0.1)
    return _level(magnitude) * 1.8 + 0.1


def _posterize_bits(magnitude: torch.Tensor, increasing: bool) -> torch.Tensor:
    bits = torch.trunc(_level(magnitude) * 4).long()
    return 4 - bits if increasing else bits


def _solarize_threshold(magnitude: torch.Tensor, increasing: bool) -> torch.Tensor:
    threshold = torch.trunc(_level(magnitude) * 256).long()  # 0.6.5 has no min(256, .) (timm >= 0.9 clamps)
    return 256 - threshold if increasing else threshold


# ----------------------------------------------------------------------------------------------- colour ops

def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """(G, C, 256) int64 counts of each channel's values."""
    g, c = x.shape[:2]
    flat = (x.long().reshape(g * c, -1) + 256 * torch.arange(g * c, device=x.device).view(-1, 1)).view(-1)
    # scatter_add_, not bincount: on CUDA bincount reads the values' range back to size its output
    counts = torch.zeros(g * c * 256, dtype=torch.int64, device=x.device)
    return counts.scatter_add_(0, flat, torch.ones(1, dtype=torch.int64, device=x.device).expand_as(flat)).view(
        g, c, 256)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x (G, C, H, W) through per-image, per-channel tables (G, C, 256)."""
    g, c, h, w = x.shape
    return torch.gather(lut.to(x.dtype), 2, x.long().reshape(g, c, h * w)).view(g, c, h, w)


def _auto_contrast(x, _magnitude, _negate):
    """PIL ImageOps.autocontrast (cutoff 0): each channel's [lo, hi] stretched to [0, 255] by int(i*scale+offset)."""
    present = _histogram(x) > 0
    lo = present.long().argmax(-1, keepdim=True).double()
    hi = (255 - present.flip(-1).long().argmax(-1, keepdim=True)).double()
    scale = _divide(255.0, (hi - lo).clamp(min=1.0))
    offset = -lo * scale
    ramp = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = torch.trunc(ramp * scale + offset).clamp(0, 255)
    return _apply_lut(x, torch.where(hi > lo, lut, ramp))


def _equalize(x, _magnitude, _negate):
    """PIL ImageOps.equalize: lut[i] = (step // 2 + count below i) // step, step from all but the top value."""
    hist = _histogram(x)
    top = 255 - (hist > 0).flip(-1).long().argmax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, top)) // 255
    below = hist.cumsum(-1) - hist
    lut = (step // 2 + below) // step.clamp(min=1)
    ramp = torch.arange(256, device=x.device).expand_as(lut)
    # a single value, or too few pixels for one step: PIL keeps the channel; PIL's point() clips the table to 255
    return _apply_lut(x, torch.where(step > 0, lut.clamp(max=255), ramp))


def _invert(x, _magnitude, _negate):
    return 255.0 - x


def _posterize_with(increasing: bool):
    def op(x, magnitude, _negate):
        # keep the top `bits` bits: value & -(2**(8 - bits)); 0 or fewer bits -> 0 (a black image, as the Pillow of
        # timm 0.6.5's day computed it; Pillow >= 10 raises for 0 bits); 8 or more bits -> unchanged, as timm
        shift = (8 - _posterize_bits(magnitude, increasing)).clamp(0, 8)
        mask = -(torch.ones_like(shift) << shift)
        return (x.long() & _per_image(mask)).to(x.dtype)
    return op


def _solarize_with(increasing: bool):
    def op(x, magnitude, _negate):
        threshold = _per_image(_solarize_threshold(magnitude, increasing)).to(x.dtype)
        return torch.where(x < threshold, x, 255.0 - x)
    return op


def _solarize_add(x, magnitude, _negate):
    add = _per_image(torch.trunc(_level(magnitude) * 110)).to(x.dtype)  # 0.6.5: no min(128, .)
    return torch.where(x < 128.0, (x + add).clamp(max=255.0), x)


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend on uint8: float32 degenerate + alpha * (image - degenerate), clipped, truncated."""
    alpha = _per_image(factor.to(torch.float32))
    return (degenerate + alpha * (image - degenerate)).clamp(0.0, 255.0).floor()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL convert('L'): (19595 R + 38470 G + 7471 B + 2**15) >> 16; a 1-channel image is its own L."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.long().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).unsqueeze(1).to(x.dtype)


def _color_degenerate(x):
    return _luma(x).expand_as(x)


def _contrast_degenerate(x):
    """A flat image of the L mean, rounded half up (int(mean + 0.5))."""
    luma = _luma(x)
    mean = _divide(luma.double().sum(dim=(1, 2, 3), keepdim=True), float(luma.shape[-1] * luma.shape[-2]))
    return torch.floor(mean + 0.5).to(x.dtype).expand_as(x)


def _brightness_degenerate(x):
    return torch.zeros_like(x)


def _sharpness_degenerate(x):
    """PIL ImageFilter.SMOOTH (3x3, centre 5, others 1, /13, rounded) inside; the 1-pixel border unchanged."""
    c = x.shape[1]
    kernel = torch.ones(c, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = torch.floor(_divide(torch.nn.functional.conv2d(x, kernel, groups=c), 13.0) + 0.5)
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = smooth
    return out


def _enhance_with(degenerate: Callable[[torch.Tensor], torch.Tensor], increasing: bool):
    def op(x, magnitude, negate):
        return _blend(degenerate(x), x, _enhance_factor(magnitude, negate, increasing))
    return op


_COLOUR_OPS: Dict[str, Callable] = {
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Posterize": _posterize_with(False),
    "PosterizeIncreasing": _posterize_with(True),
    "Solarize": _solarize_with(False),
    "SolarizeIncreasing": _solarize_with(True),
    "SolarizeAdd": _solarize_add,
}
for _name, _degenerate in (("Color", _color_degenerate), ("Contrast", _contrast_degenerate),
                           ("Brightness", _brightness_degenerate), ("Sharpness", _sharpness_degenerate)):
    _COLOUR_OPS[_name] = _enhance_with(_degenerate, increasing=False)
    _COLOUR_OPS[_name + "Increasing"] = _enhance_with(_degenerate, increasing=True)


# ----------------------------------------------------------------------------------------------- geometric ops
# Each returns PIL's AFFINE coefficients (G, 6) = (a, b, c, d, e, f): output pixel centre (x, y) reads the input at
# (a x + b y + c, d x + e y + f).

def _affine(g: int, like: torch.Tensor, **coefficients: torch.Tensor) -> torch.Tensor:
    mats = torch.eye(2, 3, dtype=torch.float64, device=like.device).reshape(1, 6).repeat(g, 1)  # made there
    for position, value in coefficients.items():
        mats[:, "abcdef".index(position)] = value
    return mats


def _shear_x(magnitude, negate, _h, _w):
    return _affine(len(magnitude), magnitude, b=_signed(_level(magnitude) * 0.3, negate))


def _shear_y(magnitude, negate, _h, _w):
    return _affine(len(magnitude), magnitude, d=_signed(_level(magnitude) * 0.3, negate))


def _translate_x(magnitude, negate, _h, w):
    return _affine(len(magnitude), magnitude, c=_signed(_level(magnitude) * TRANSLATE_PCT, negate) * w)


def _translate_y(magnitude, negate, h, _w):
    return _affine(len(magnitude), magnitude, f=_signed(_level(magnitude) * TRANSLATE_PCT, negate) * h)


def _rotate(magnitude, negate, h, w):
    """PIL Image.rotate(degrees) about (w/2, h/2): the inverse rotation, coefficients rounded to 15 decimals."""
    degrees = torch.remainder(_signed(_level(magnitude) * 30.0, negate), 360.0)
    angle = -torch.deg2rad(degrees)
    cos, sin = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)
    cx, cy = w / 2.0, h / 2.0
    return torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], dim=1)


_GEOMETRIC_OPS: Dict[str, Callable] = {
    "Rotate": _rotate,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}
# The ops whose output pixel reads its own input row ('x': d = 0, e = 1, f = 0) or column ('y'): PIL's 2-D filter
# then has an exactly zero offset across, so sampling along the one axis gives the same bits, 4 (bicubic) or 2
# (bilinear) times cheaper.
_AXIS = {"Rotate": "xy", "ShearX": "x", "TranslateXRel": "x", "ShearY": "y", "TranslateYRel": "y"}


def _warp(x: torch.Tensor, mats: torch.Tensor, bicubic: bool, fill: torch.Tensor, axis: str = "xy") -> torch.Tensor:
    """PIL Image.transform(AFFINE, BILINEAR or BICUBIC, fillcolor) of each image by its own matrix."""
    g, c, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=x.device) + 0.5,
                            torch.arange(w, dtype=torch.float64, device=x.device) + 0.5, indexing="ij")
    a, b, c0, d, e, f = (m.view(g, 1, 1) for m in mats.unbind(1))
    sx = a * xs + b * ys + c0  # PIL's affine_transform, in double as PIL
    sy = d * xs + e * ys + f
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    pixels = x.to(torch.float64)
    if axis == "x":
        value = _along_rows(pixels, sx - 0.5, bicubic)
    elif axis == "y":
        value = _along_rows(pixels.transpose(2, 3), (sy - 0.5).transpose(1, 2), bicubic).transpose(2, 3)
    else:
        sample = _bicubic if bicubic else _bilinear
        value = sample(pixels.reshape(g, c, h * w), sx - 0.5, sy - 0.5, h, w)
    return torch.where(inside.unsqueeze(1), value, fill.view(1, c, 1, 1)).to(x.dtype)


def _along_rows(pixels: torch.Tensor, px: torch.Tensor, bicubic: bool) -> torch.Tensor:
    """PIL's filter where each output pixel samples its own row at px (G, H, W): the taps of that row only."""
    g, c, h, w = pixels.shape
    x0 = torch.floor(px)
    dx = (px - x0).unsqueeze(1)
    first, count = (1, 4) if bicubic else (0, 2)
    row_start = (torch.arange(h, device=px.device) * w).view(1, h, 1)
    flat = pixels.reshape(g, c, h * w)
    taps = [_tap(flat, row_start, (x0.long() - first + i).clamp(0, w - 1), (g, c, h, w)) for i in range(count)]
    if bicubic:
        return torch.trunc(_cubic(*taps, dx).clamp(0.0, 255.0))
    return torch.trunc(taps[0] + (taps[1] - taps[0]) * dx)


def _tap_grid(px: torch.Tensor, py: torch.Tensor, first: int, count: int, h: int, w: int):
    """The fractional offsets (G, 1, H, W) and the clamped (PIL's XCLIP/YCLIP) row starts and columns of `count`
    taps from floor - `first` on, each (G, H*W)."""
    x0, y0 = torch.floor(px), torch.floor(py)
    dx, dy = (px - x0).unsqueeze(1), (py - y0).unsqueeze(1)
    x0, y0 = x0.long().flatten(1) - first, y0.long().flatten(1) - first
    rows = [(y0 + j).clamp(0, h - 1) * w for j in range(count)]
    cols = [(x0 + i).clamp(0, w - 1) for i in range(count)]
    return dx, dy, rows, cols


def _tap(flat: torch.Tensor, row: torch.Tensor, col: torch.Tensor, shape) -> torch.Tensor:
    g, c, _ = flat.shape
    index = (row + col).reshape(g, 1, -1).expand(g, c, -1)
    return torch.gather(flat, 2, index).view(shape)


def _bilinear(flat, px, py, h, w):
    dx, dy, rows, cols = _tap_grid(px, py, 0, 2, h, w)
    shape = (flat.shape[0], flat.shape[1], h, w)
    lerped = []
    for row in rows:
        left, right = _tap(flat, row, cols[0], shape), _tap(flat, row, cols[1], shape)
        lerped.append(left + (right - left) * dx)
    return torch.trunc(lerped[0] + (lerped[1] - lerped[0]) * dy)  # PIL: (UINT8) cast of a value in [0, 255]


def _cubic(v1, v2, v3, v4, d):
    """PIL Geometry.c BICUBIC (cubic convolution with a = -1), the same operation order."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _bicubic(flat, px, py, h, w):
    dx, dy, rows, cols = _tap_grid(px, py, 1, 4, h, w)
    shape = (flat.shape[0], flat.shape[1], h, w)
    cubics = [_cubic(*(_tap(flat, row, col, shape) for col in cols), dx) for row in rows]
    return torch.trunc(_cubic(*cubics, dy).clamp(0.0, 255.0))
