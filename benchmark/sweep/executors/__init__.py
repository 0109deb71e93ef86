"""The executors a sweep submits its runs with, one module each."""
