"""Run best-of-N, AISP and MISVO on three prompts through :func:`prelogit.shard.run_sharded` and write the
records (main process only). Started by tests/test_shard.py both as a plain process and under
``accelerate launch --num_processes 2 --cpu``; not a test module itself.

Usage: python tests/shard_worker.py OUT.json TOKENIZER_DIR
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from toy_rewards import VowelShare  # noqa: E402

from prelogit import shard  # noqa: E402
from prelogit.aisp import AISPConfig, run_aisp_many  # noqa: E402
from prelogit.engine import prompt_generator, run_best_of_n_many  # noqa: E402
from prelogit.misvo import MISVOConfig, run_misvo_many  # noqa: E402
from prelogit.sampling import PrelogitSampler  # noqa: E402


def main(out: str, tokenizer_dir: str) -> None:
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    tok.padding_side = "left"
    torch.manual_seed(0)  # the tiny Llama of tests/conftest.py, in float64
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval().double()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    sampler = PrelogitSampler(model, tok, max_new_tokens=5)
    reward = VowelShare()
    rows = [{"id": f"p{i}", "text": t} for i, t in enumerate(["Hi!", "What did you cook yesterday?", "I lost my keys.",
                                                               "Good morning to you."][:3])]

    def args(rs):
        return [r["text"] for r in rs], [r["text"] for r in rs], [prompt_generator(5, r["id"]) for r in rs]

    def bon(rs):
        p, u, g = args(rs)
        return run_best_of_n_many(sampler, reward, p, u, 4, g)

    def aisp(rs):
        p, u, g = args(rs)
        return run_aisp_many(sampler, reward, p, u, AISPConfig(sigma=0.5, lam=0.1, n=2, K=2, tau=2), g)

    def misvo(rs):
        p, u, g = args(rs)
        return run_misvo_many(sampler, reward, p, u, MISVOConfig(eta=20.0, lam=1.0, K=2, steps=2), g)

    results = {name: shard.run_sharded(rows, fn) for name, fn in (("bon", bon), ("aisp", aisp), ("misvo", misvo))}
    rank, size = shard.world()
    if shard.is_main():
        Path(out).write_text(json.dumps({"world": size, "rank": rank, **results}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
