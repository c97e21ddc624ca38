"""``coco-shim``: operator and debugging commands (check, vm, measure, install)."""
