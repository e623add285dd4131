"""Helpers shared by the test suite: where things are, synthetic weights, the pack as ComfyUI
loaded it, a live server, a browser, the workflow files. One helper for each job."""
