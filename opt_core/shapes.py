"""The letters of shape comments and einsum subscripts, one meaning each, in every package.

    B  batch rows (prompts)
    K  beams per prompt (beam search works on B * K rows)
    R  rows of one generation step (B, or B * K under beam search)
    T  new tokens of a call (the queries)
    S  keys: cached + new tokens, or a static cache's slots
    H  attention heads
    D  head_dim (hidden_size / heads)
    C  hidden_size (the decoder's width)
    E  word_embed_proj_dim (the token table's width; C unless project_in/out exist)
    F  ffn_dim
    V  vocab_size
    L  num_labels (sequence classification)
    N  rows of a flattened matmul (every leading axis folded into one: B * T)
    W  n-gram windows of a sequence (no_repeat_ngram_size)

A suffix names a bound: `S_max`, `T_max` (a static buffer's length). Lower-case names in a shape
(`n`, `in`, `out`) are a function's own arguments. So `# [B, H, T, D]` is the same array in
opt_torch, opt_tf, opt_flax and the NumPy reference, and
`einsum("BHTD,BHSD->BHTS", q, k)` reads as the attention scores everywhere.
"""

from __future__ import annotations

LETTERS: dict[str, str] = {
    "B": "batch rows",
    "K": "beams per prompt",
    "R": "rows of one generation step",
    "T": "new tokens (queries)",
    "S": "keys (cached + new, or cache slots)",
    "H": "attention heads",
    "D": "head_dim",
    "C": "hidden_size",
    "E": "word_embed_proj_dim",
    "F": "ffn_dim",
    "V": "vocab_size",
    "L": "num_labels",
    "N": "rows of a flattened matmul",
    "W": "n-gram windows",
}
