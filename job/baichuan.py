"""The Baichuan family, torch-free: the one description the planner and the model share.

Token ids (SentencePiece `tokenizer.model`): `<unk>` = 0, also used as padding; `<s>` = 1;
`</s>` = 2. `IGNORE_INDEX` is torch's cross-entropy default: labels set to it carry no loss.
"""

from __future__ import annotations

UNK_ID = 0
PAD_ID = UNK_ID  # Baichuan pads with <unk>
BOS_ID = 1
EOS_ID = 2
IGNORE_INDEX = -100
