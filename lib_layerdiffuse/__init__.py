"""LayerDiffuse in plain torch: the transparent VAE networks, RGBA maths, weight files.

Nothing here imports ComfyUI; the node pack (../nodes) translates between ComfyUI types and this.
"""
