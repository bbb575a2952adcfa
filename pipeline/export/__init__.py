"""Export: a trained MultiModalCLIP to open_clip's `local-dir:` format, to transformers, or to plain safetensors.

Our image/text towers are open_clip's own modules, so the open_clip export is a key rename plus
a config, and the transformers one (CLIPModel) a key table (pipeline.models.clip_keys); towers a
target cannot express go beside it or are refused by option name. Reads weights, never trains.
"""
