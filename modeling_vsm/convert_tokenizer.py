"""The tokenizer of a published LISA / SEAL folder (written by transformers 4.31) as a `tokenizers` pipeline that gives
the ids the original code gave.

LISA and SEAL tokenized with the slow sentencepiece `LlamaTokenizer` of transformers 4.31 and LLaVA's
`tokenizer_image_token` (each chunk around `<image>` tokenized on its own, one -200 between chunks, one BOS). What that
did, found by running 4.31 on such folders (and what current transformers does differently when it loads them):

- every piece of text between "no-split" tokens (the special tokens and `added_tokens.json`: `[SEG]` / `[LOC]`,
  `<im_start>`, `<im_end>`) is encoded by sentencepiece on its own, so each gets the "▁" dummy prefix, even one that
  already starts with a space (`legacy=True`, the 4.31 default). Here: a normalizer that prepends "▁" and turns spaces
  into "▁", no pre-tokenizer.
- a no-split token given as a plain string strips all whitespace on both sides of it (the space before `<im_start>`,
  the newline after `<im_end>`); one stored as an AddedToken dict keeps its own lstrip / rstrip. Here: the same flags.
- merges follow the sentencepiece model's piece scores (current transformers orders them by id, which merges runs of
  spaces differently on Llama's vocabulary).
- `<image>`, the placeholder of the image positions, is a special token of its own that strips nothing: whole-string
  tokenization then equals the per-chunk one for the `llava_v1` prompts (`<image>` always sits between `<im_start>`
  and `<im_end>`, which split and strip already).

Saved with `save_pretrained`, the result is a `tokenizer.json` that `AutoTokenizer` loads as it is (tokenizer class
`TokenizersBackend`, no rebuild from `tokenizer.model`).
"""

import json
import logging
from pathlib import Path

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # LlamaTokenizer's
SPIECE_UNDERLINE = "\u2581"
logger = logging.getLogger(__name__)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def special_tokens_431(folder: Path) -> tuple[dict, dict, list]:
    """The special tokens as 4.31's `from_pretrained` set them: tokenizer_config.json, each entry overridden by
    special_tokens_map.json. Returns ({name: content}, {content: (lstrip, rstrip)} of the AddedToken dicts,
    [additional special tokens])."""
    config = _read_json(folder / "tokenizer_config.json")
    values = {key: config[key] for key in SPECIAL_KEYS + ("additional_special_tokens",) if config.get(key) is not None}
    values.update(_read_json(folder / "special_tokens_map.json"))
    for key, default in DEFAULT_SPECIALS.items():
        values.setdefault(key, default)

    def content(token):
        return token["content"] if isinstance(token, dict) else token

    strip = {}
    for key in SPECIAL_KEYS + ("additional_special_tokens",):
        tokens = values.get(key, [])
        for token in tokens if isinstance(tokens, list) else [tokens]:
            if isinstance(token, dict):  # an AddedToken: its own flags (a plain string strips both sides)
                strip[token["content"]] = (bool(token.get("lstrip", False)), bool(token.get("rstrip", False)))
    named = {key: content(values[key]) for key in SPECIAL_KEYS if key in values}
    additional = [content(token) for token in values.get("additional_special_tokens", [])]
    return named, strip, additional


def sentencepiece_bpe(model_file: Path):
    """(processor, vocab, merges) of a Llama-style sentencepiece BPE model; a merge ranks by the score of the piece it
    makes (sentencepiece's order), among the normal pieces (not unknown, control or byte pieces)."""
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    normal = {piece: i for piece, i in vocab.items()
              if not (processor.is_unknown(i) or processor.is_control(i) or processor.is_byte(i))}
    merges = []
    for piece, index in sorted(normal.items(), key=lambda item: (-processor.get_score(item[1]), item[1])):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
        merges += sorted(splits, key=lambda pair: (normal[pair[0]], normal[pair[1]]))
    check_llama_style(processor)
    return processor, vocab, merges


def check_llama_style(processor) -> None:
    """The pipeline assumes Llama's sentencepiece settings: a dummy prefix, spaces kept, byte fallback."""
    pieces = processor.encode("a  b ", out_type=str)
    newline = processor.piece_to_id("<0x0A>")
    if "".join(pieces) != f"{SPIECE_UNDERLINE}a{SPIECE_UNDERLINE}{SPIECE_UNDERLINE}b{SPIECE_UNDERLINE}" or not (
        newline != processor.unk_id() and processor.is_byte(newline)
    ):
        raise ValueError("tokenizer.model is not a Llama-style sentencepiece model (dummy prefix, spaces kept, byte "
                         f"fallback): 'a  b ' encodes to {pieces}.")


def llava_v1_tokenizer(folder, image_token: str = "<image>"):
    """A `PreTrainedTokenizerFast` of a 4.31 LLaVA-v1 tokenizer folder (`tokenizer.model`, `tokenizer_config.json`,
    `special_tokens_map.json`, `added_tokens.json`): the checkpoint's ids, and `image_token` added after them as the
    image placeholder. Encoding a prompt whose `<image>` is written as N `image_token`s gives LLaVA's
    `tokenizer_image_token` ids of 4.31, with the -200 as N placeholder ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / "tokenizer.model").is_file():
        raise ValueError(f"{folder} has no tokenizer.model (the sentencepiece model LISA and SEAL ship).")
    config = _read_json(folder / "tokenizer_config.json")
    if config.get("legacy", True) is not True:
        # 4.31 with legacy=False cut the "▁" off the first piece after a no-split token and looked the rest up as a
        # piece (<unk> when absent): no tokenizers pipeline does that. The legacy pipeline differs only there.
        logger.warning(f"{folder}/tokenizer_config.json says legacy={config.get('legacy')!r}: the first word after "
                       "<im_end> or [SEG] may get another id than transformers 4.31 gave it (every other id is equal).")
    sentencepiece_model, vocab, merges = sentencepiece_bpe(folder / "tokenizer.model")
    named, strip, additional = special_tokens_431(folder)
    added = _read_json(folder / "added_tokens.json")

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=sentencepiece_model.id_to_piece(sentencepiece_model.unk_id()),
                            fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    # 4.31's no-split tokens: the special tokens and added_tokens.json (ids right after the sentencepiece pieces).
    specials = set(named.values()) | set(additional)
    no_split = [token for token in dict.fromkeys([*named.values(), *additional]) if token in vocab]
    for offset, (token, index) in enumerate(sorted(added.items(), key=lambda item: item[1])):
        if index != len(vocab) + offset:
            raise ValueError(f"added_tokens.json gives {token!r} id {index}, expected {len(vocab) + offset} (ids must follow "
                             "the sentencepiece model's without gaps, as transformers 4.31 required).")
        no_split.append(token)
    for token in no_split:
        lstrip, rstrip = strip.get(token, (True, True))
        backend.add_tokens([AddedToken(token, lstrip=lstrip, rstrip=rstrip, normalized=False, special=token in specials)])
    if image_token in vocab or image_token in added:
        raise ValueError(f"The image placeholder {image_token!r} is already a token of {folder}.")
    backend.add_special_tokens([AddedToken(image_token, lstrip=False, rstrip=False, normalized=False, special=True)])

    bos, eos = named["bos_token"], named["eos_token"]
    single = "$A:0"
    if config.get("add_bos_token", True):
        single = f"{bos}:0 {single}"
    if config.get("add_eos_token", False):
        single = f"{single} {eos}:0"
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=f"{single} {single.replace('$A', '$B')}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=config.get("model_max_length", 2048),
        padding_side="left",  # batched generation
        clean_up_tokenization_spaces=False,
        **{"pad_token": named["unk_token"], **named},  # LISA and SEAL pad with <unk>
    )
