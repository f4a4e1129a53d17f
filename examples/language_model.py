"""Choosing the sequences a language model trains on: ``SelectiveLoader`` + ``LanguageModelScorer``.

Run it from anywhere in the repository (``make data`` installs the speeches first)::

    python examples/language_model.py             # about a minute on two CPU cores
    python examples/language_model.py --steps 60

The steps:

1. The State of the Union addresses become byte-token sequences of 64 tokens in MDS shards
   (built once under ``data/sotu-example``): a pool with one stream per era, 40% of its
   sequences corrupted (shuffled or random bytes), and a small clean split.
2. A small causal Transformer, the *reference*, trains briefly on the clean split;
   ``jest_stream.annotate`` stores its loss on every pool sequence in a reference cache.
3. A fresh Transformer, the *learner*, trains on the 16 most learnable of every 80 pool
   sequences (its loss minus the stored reference loss): a ``SelectiveLoader`` over a
   ``SampleIdStreamingDataset`` of the three streams, scored by a ``LanguageModelScorer``.
   It prints the share of corrupted sequences it trained on (the pool has 40%).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

# The example reuses the benchmark's data preparation and model; make them importable from
# wherever the script is started.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common.data import read_columns  # noqa: E402
from benchmarks.common.text import PAD_ID, VOCAB_SIZE, open_pool, prepare_text  # noqa: E402
from benchmarks.common.training import train_on_arrays  # noqa: E402
from benchmarks.language_model import lm_loss, make_lm  # noqa: E402
from jest_stream import (  # noqa: E402
    LanguageModelScorer,
    ReferenceCache,
    SelectiveLoader,
    annotate,
    model_checksum,
    sequence_losses,
)

SEQ_LEN = 64
SHAPE = {'seq_len': SEQ_LEN, 'width': 128, 'depth': 2, 'heads': 4}
TRANSFORM_ID = f'utf-8 bytes, padding {PAD_ID}'


def stored_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence loss for ``annotate``; padding has its own id, so the mask is in the ids."""
    return sequence_losses(logits, input_ids, attention_mask=input_ids != PAD_ID)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=40, help='learner steps')
    parser.add_argument('--reference-steps', type=int, default=150)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    data = prepare_text(REPO_ROOT / 'data' / 'sotu-example', seq_len=SEQ_LEN, pool_limit=4000)

    reference = make_lm(1, **SHAPE)
    clean = read_columns(data.reference_dir, ['input_ids', 'attention_mask'])
    train_on_arrays(reference, clean, lm_loss, steps=args.reference_steps, batch_size=32,
                    lr=2e-3, seed=0, progress=True, desc='reference')
    checksum = model_checksum(reference)
    cache_dir = REPO_ROOT / 'data' / 'sotu-example-references' / checksum[:16]
    dataset = open_pool(data, batch_size=512, seed=0, shuffle=False)
    annotate(out=cache_dir, model=reference, transform_id=TRANSFORM_ID, dataset=dataset,
             input_key='input_ids', target_key='input_ids', loss_fn=stored_loss,
             batch_size=512, num_workers=0)
    cache = ReferenceCache(cache_dir, dataset=dataset, model_checksum=checksum,
                           transform=TRANSFORM_ID)
    del dataset

    learner = make_lm(0, **SHAPE)
    scorer = LanguageModelScorer(learner, cache, input_key='input_ids',
                                 attention_mask_key='attention_mask', vocab_size=VOCAB_SIZE)
    loader = SelectiveLoader(open_pool(data, batch_size=80, seed=0), batch_size=16,
                             filter_ratio=0.8, scorer=scorer, criterion='learnability',
                             method='topk')
    optimizer = torch.optim.Adam(learner.parameters(), lr=2e-3)
    noisy = seen = 0
    for step, batch in enumerate(loader, 1):
        loss = lm_loss(learner, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        noisy, seen = noisy + int(batch['noisy'].sum()), seen + len(batch['noisy'])
        if step % 10 == 0:
            print(f'step {step}: loss {loss.item():.3f} nats/byte, corrupted sequences trained '
                  f'on so far {noisy / seen:.0%} (pool: 40%)')
        if step == args.steps:
            break
    del loader
    gc.collect()


if __name__ == '__main__':
    main()
