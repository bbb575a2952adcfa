"""Export: a trained MultiModalCLIP to open_clip's `local-dir:` format, or to plain safetensors.

Our image/text towers are open_clip's own modules, so the open_clip export is a key rename plus
a config; towers open_clip cannot express (audio) go beside it. Reads weights, never trains.
"""
