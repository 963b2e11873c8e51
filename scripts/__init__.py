"""The GPU check's helpers (scripts/gpu_check.sh runs them as ``python -m scripts.<name>`` from
the repository root, so that the in-place build of torchmatgrad is imported)."""
