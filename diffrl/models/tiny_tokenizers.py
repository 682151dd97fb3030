"""In-memory tokenizers for the tiny models: byte- or character-level vocabularies in the classes the real
checkpoints use (CLIP, T5, Qwen2, Mistral / Pixtral, a masked-diffusion LM's), so a pipeline saved with them
reloads through ``from_pretrained`` and every prompt tokenizes without a download."""

from __future__ import annotations

import string

# The shared character-level vocabulary of the tiny text encoders: every prompt tokenizes to characters.
T5_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,:;!?'\"-+*/=()<>#%$&@_"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: 256 printable stand-ins for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def tiny_clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer with a byte-level vocabulary and no merges (514 tokens)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = list(_bytes_to_unicode().values())
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 512):
    """A character-level T5Tokenizer (Unigram model, pad=0, eos=1)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(ch, -2.0) for ch in T5_CHARS if ch != " "]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


# Qwen3's chat layout (FLUX.2 [klein] renders prompts with it; enable_thinking=False adds the empty think block).
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def tiny_qwen_tokenizer():
    """A Qwen2Tokenizer with a byte-level vocabulary, no merges, Qwen's chat markers (259 tokens) and a Qwen3
    chat template."""
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# Mistral's instruction layout with a system prompt, for message contents given as lists of typed parts.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]{% endif %}"
    "{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'system' %}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[/INST]{% endif %}"
    "{% endfor %}")


def tiny_pixtral_processor():
    """A PixtralProcessor (Mistral Small 3.1's, which FLUX.2 [dev] prompts through): a byte-level BPE tokenizer
    with no merges, Mistral's control tokens as single tokens, 4-pixel image patches and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]",
               "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    vocab = {tok: i for i, tok in enumerate(special)}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>",
                                        additional_special_tokens=special[4:])
    return PixtralProcessor(image_processor=PixtralImageProcessor(patch_size=4, size={"longest_edge": 32}),
                            tokenizer=tokenizer, patch_size=4, spatial_merge_size=2,
                            chat_template=MISTRAL_CHAT_TEMPLATE)


DLLM_SPECIAL = ["<|pad|>", "<|unk|>", "<|bos|>", "<|eos|>", "<|mdm_mask|>", "<|user|>", "<|assistant|>"]
DLLM_CHARS = string.digits + string.ascii_letters + " +-*/=().,:;?!'\"<>#\\{}_^%$\n"
DLLM_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|user|>' if m['role'] == 'user' else '<|assistant|>' }}{{ m['content'] }}"
    "{% if m['role'] != 'user' %}<|eos|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def dllm_fast_tokenizer(vocab: dict[str, int], pre_tokenizer, *, decoder=None, mask_token: bool = True):
    """A fast word-level tokenizer over ``vocab`` (DLLM_SPECIAL first; unknown pieces become ``<|unk|>``) split
    by ``pre_tokenizer``, with the masked LMs' special tokens (no mask token for uniform-noise models such as
    DiffusionGemma) and their chat template."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        backend.decoder = decoder
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", unk_token="<|unk|>",
                                        bos_token="<|bos|>", eos_token="<|eos|>",
                                        mask_token="<|mdm_mask|>" if mask_token else None,
                                        additional_special_tokens=["<|user|>", "<|assistant|>"])
    tokenizer.chat_template = DLLM_CHAT_TEMPLATE
    return tokenizer


def dllm_special_tokens(*, mask_token: bool = True) -> dict[str, int]:
    return {tok: i for i, tok in enumerate(t for t in DLLM_SPECIAL if mask_token or t != "<|mdm_mask|>")}


def tiny_dllm_tokenizer(*, mask_token: bool = True):
    """A character-level fast tokenizer with a chat template (and a mask token unless ``mask_token=False``:
    uniform-noise models such as DiffusionGemma have none)."""
    from tokenizers import Regex, decoders, pre_tokenizers

    vocab = dllm_special_tokens(mask_token=mask_token)
    for ch in DLLM_CHARS:
        vocab.setdefault(ch, len(vocab))
    return dllm_fast_tokenizer(vocab, pre_tokenizers.Split(Regex("."), behavior="isolated"),
                               decoder=decoders.Fuse(), mask_token=mask_token)
