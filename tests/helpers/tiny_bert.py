"""A tiny random BERT folder, as transformers' from_pretrained reads one, for the hf_text tower's tests."""
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_bert(folder: Path, words: list[str], model_class: str = "BertModel") -> Path:
    """Random weights and a WordPiece vocabulary of `words` (transformers 5 takes it as `vocab`; a `vocab_file`
    argument is ignored and leaves every word [UNK])."""
    import transformers
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + words
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert tokenizer.convert_tokens_to_ids(words) == list(range(len(SPECIALS), len(vocab)))
    tokenizer.save_pretrained(folder)
    model = getattr(transformers, model_class)(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(folder)
    return folder
