"""A tiny byte-level BPE tokenizer built in memory (no hub), shared by the data and evaluation tests."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Answer: 3 + 4 = 7 apples.\n#### 7",
    "The cat sat on the mat. The dog ran in the park.",
    "Calculate 12 * 3 - 5. A train travels 60 miles per hour for 2 hours.",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
"""One user turn only (every message is written as the user's): conversations cannot be split by it."""
CHATML_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
"""ChatML's shape: each turn ends with the EOS token and a newline."""


def tiny_tokenizer(chat: bool | str = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (exact decode round trip), EOS and pad, optionally a chat template
    (``chat=True``: :data:`CHAT_TEMPLATE`, ``chat="chatml"``: :data:`CHATML_TEMPLATE`)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                      clean_up_tokenization_spaces=False)
    if chat:
        wrapped.chat_template = CHATML_TEMPLATE if chat == "chatml" else CHAT_TEMPLATE
    return wrapped
