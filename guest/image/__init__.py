"""Builder of the reference guest image (initramfs): kernel modules, cpio, cache, recipe.

Runs on the host only; it is never copied into the image.
"""
