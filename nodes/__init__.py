"""ComfyUI nodes of the pack: thin translations between ComfyUI types and lib_layerdiffuse."""
