"""Data: WebDataset shards in, batches of modality tensors (plus presence masks) out.

Owns shard specs, decoding (PIL, soundfile), per-modality preprocessing, corruption counting and
the shard writer. Knows nothing about models, losses or the training loop.
"""
