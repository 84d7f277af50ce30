"""The demo kit, outside the model library: the synthetic shapes set (`shapes`), its scorer (`scoring`), the toy
text encoder (`text_encoder`) and the CLI that builds the demo's assets (`python -m hdm_demo.assets`).

hdm_demo imports hdm_core; hdm_core never imports hdm_demo (the trainer builds no demo assets).
"""
