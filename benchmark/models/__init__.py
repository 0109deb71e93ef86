"""Models: the zoo of timm models (zoo.py) and the feature taps over them (taps.py)."""
