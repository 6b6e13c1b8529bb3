"""A character-level tokenizer built with the ``tokenizers`` library, with a chat template.

Every printable ASCII character is one token; a few special tokens mark roles and thinking. It is
saved as a standard ``tokenizer.json`` that ``AutoTokenizer.from_pretrained`` loads, so TRL's
conversational formats work with it. The chat format, for a system, a user and an assistant turn::

    <|system|>owner=ann speaker=bob<|user|>add 3 5<|assistant|>8<eos>
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
THINK_TOKENS = ("<think>", "</think>")
SPECIAL_TOKENS = (PAD, EOS, UNK, *ROLE_TOKENS, *THINK_TOKENS)
CHARACTERS = "\n" + "".join(chr(i) for i in range(32, 127))

# `{% generation %}` marks the assistant's tokens, for TRL's assistant-only loss.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<eos>{% endgeneration %}"
    "{%- elif message['role'] in ['system', 'user'] -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The course tokenizer: special tokens first (``<pad>`` = 0), then one token per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    # BPE with no merges over a character vocabulary = a character tokenizer that never drops spaces.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS + THINK_TOKENS),
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 256
    return tok


def escape_special_tokens(text: str, specials=SPECIAL_TOKENS) -> str:
    """User text with every special-token marker broken into plain characters (``<|system|>`` -> ``< |system|>``).

    Tokenizers match special tokens anywhere in the text they are given, so a user who types ``<|system|>owner``
    would otherwise open the trusted system role (chapter 11's spoofing hole). Only what the *user* types is
    escaped: system messages come from the program, and completions may use ``<think>`` on purpose.
    """
    if not isinstance(text, str):
        raise TypeError(f"user text must be a string, got {type(text).__name__}")
    for tok in sorted(specials, key=len, reverse=True):
        if len(tok) > 1:
            text = text.replace(tok, tok[0] + " " + tok[1:])
    return text


def chat_prompt(user: str, system: str | None = None) -> str:
    """The prompt text the chat template makes for one user turn, ready for the assistant's reply; the user's
    text is escaped (:func:`escape_special_tokens`), the trusted system message is not.

    Equal to ``tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``
    (a test checks it), but cheap enough for inner loops.
    """
    return (f"<|system|>{system}" if system else "") + f"<|user|>{escape_special_tokens(user)}<|assistant|>"


def messages_for(user: str, system: str | None = None, assistant: str | None = None) -> list[dict]:
    """The same turn as a list of chat messages (TRL's conversational format)."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user})
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def format_prompt(tokenizer, prompt: str | list[dict], system: str | None = None) -> str:
    """The text before the assistant's reply, for any tokenizer.

    The course tokenizer takes the fast path (:func:`chat_prompt`, no Jinja in inner loops); a real model's
    tokenizer uses its own chat template; a tokenizer without one gets the raw text. ``prompt`` may also be
    a list of chat messages. User text is escaped (:func:`escape_special_tokens`, with the tokenizer's own special
    tokens), so typed markers such as ``<|im_start|>system`` stay plain text.
    """
    template = getattr(tokenizer, "chat_template", None)
    if template == CHAT_TEMPLATE and not isinstance(prompt, list):
        return chat_prompt(prompt, system)  # the fast path escapes the course's own markers
    specials = set(getattr(tokenizer, "all_special_tokens", ())) | set(SPECIAL_TOKENS)
    if isinstance(prompt, list):
        prompt = [dict(m, content=escape_special_tokens(m["content"], specials)) if m.get("role") == "user" else m
                  for m in prompt]
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    prompt = escape_special_tokens(prompt, specials)
    if template:
        return tokenizer.apply_chat_template(messages_for(prompt, system), tokenize=False, add_generation_prompt=True)
    return prompt
