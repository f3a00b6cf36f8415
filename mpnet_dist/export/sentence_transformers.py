"""The files that make an exported MPNetForMaskedLM folder a sentence-transformers model (mean pooling).

`SentenceTransformer(OUT)` reads modules.json: module 0 is the transformer in the folder itself, module 1
mean-pools its token embeddings (1_Pooling/config.json). The transformer is loaded as the masked-LM model
(`transformer_task: fill-mask`) and its last hidden states are pooled: loaded as a bare MPNetModel, the folder
would report the LM head as unexpected weights and the (absent) pooler as missing ones. The same weights file
keeps serving `AutoModelForMaskedLM.from_pretrained(OUT)`. Needs sentence-transformers >= 6.0 (the first with
`transformer_task`); older versions refuse the config.
"""

from __future__ import annotations

import json
from pathlib import Path

MODULES_FILE = "modules.json"
CONFIG_FILE = "sentence_bert_config.json"
POOLING_DIR = "1_Pooling"


def write_sentence_transformers_files(folder: Path, hidden_size: int, max_seq_length: int) -> None:
    """Write modules.json, sentence_bert_config.json and 1_Pooling/config.json into an exported HF folder."""
    folder = Path(folder)
    modules = [
        # The pre-6.0 class paths: sentence-transformers 6 maps them to its current modules.
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    transformer = {
        "max_seq_length": max_seq_length,
        "do_lower_case": False,  # the tokenizer lowercases by itself when it was trained to
        "transformer_task": "fill-mask",
        # The masked-LM forward's last hidden states ([B, L, H]), not its logits.
        "modality_config": {"text": {"method": "forward", "method_output_name": ["hidden_states", -1]}},
        "module_output_name": "token_embeddings",
    }
    pooling = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    _write_json(folder / MODULES_FILE, modules)
    _write_json(folder / CONFIG_FILE, transformer)
    (folder / POOLING_DIR).mkdir(exist_ok=True)
    _write_json(folder / POOLING_DIR / "config.json", pooling)


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
