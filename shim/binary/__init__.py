"""The start/delete contract containerd execs (``containerd-shim-coco-v2 start|delete``): cheap,
on containerd's critical path. Nothing below imports it."""
