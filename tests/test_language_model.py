"""Per-sequence losses of causal language models: the loss by hand, padding and ignored labels,
chunks, live and stored references, selection over real MDS token shards, and bad input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jest_stream import (
    ColumnReference,
    DataError,
    JestStreamError,
    LanguageModelScorer,
    MissingColumnError,
    ScoreError,
    SelectionConfig,
    SelectionStep,
    SelectiveLoader,
    SettingError,
    SettingTypeError,
    annotate,
    get_criterion,
    sequence_losses,
)
from jest_stream.cache import (
    ReferenceCache,
    model_checksum,
)

VOCAB = 16
LENGTH = 12
LEARNABILITY = get_criterion('learnability')
HARD_LEARNER = get_criterion('hard_learner')
EASY_REFERENCE = get_criterion('easy_reference')


class TinyCausalLM(nn.Module):
    """Token and position embeddings, one Transformer layer under a causal mask, a linear head.

    ``attention_mask`` (0 at padding) zeroes the embeddings of padding tokens.
    """

    def __init__(self, seed: int = 0, vocab: int = VOCAB, length: int = LENGTH,
                 width: int = 32) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, width)
            self.position = nn.Embedding(length, width)
            self.layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=64,
                                                    dropout=0.0, batch_first=True)
            self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        length = input_ids.shape[1]
        x = self.embed(input_ids) + self.position(torch.arange(length))
        if attention_mask is not None:
            x = x * (attention_mask != 0).unsqueeze(-1)
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        return self.head(self.layer(x, src_mask=causal, is_causal=True))


@dataclass
class CausalLMOutput:
    """What a Hugging Face causal LM returns: an object with ``.logits``."""

    logits: Tensor


class HuggingFaceStyle(nn.Module):
    """A model called as ``model(input_ids, attention_mask=...)`` that returns ``.logits``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> CausalLMOutput:
        return CausalLMOutput(logits=self.lm(input_ids, attention_mask))


def _token_batch(n: int = 10, seed: int = 0) -> dict[str, Tensor]:
    """Random sequences with right and left padding, ignored labels, and two sequences with no
    counted token (row 3: every label -100; row 4: one real token, nothing to predict)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    mask[0, 7:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    mask[4, 1:] = 0
    mask[5, 2:] = 0  # a single target
    labels = ids.clone()
    labels[2, ::3] = -100
    labels[3, :] = -100
    labels[6, :5] = -100
    return {'input_ids': ids, 'attention_mask': mask, 'labels': labels,
            'sample_id': torch.arange(100, 100 + n)}


def _hand_losses(logits: Tensor, batch: dict[str, Tensor], reduction: str
                 ) -> tuple[list[float], list[bool]]:
    """Each sequence's loss, one token at a time, in float64."""
    losses, counted = [], []
    for i in range(logits.shape[0]):
        terms = []
        for t in range(LENGTH - 1):
            target = int(batch['labels'][i, t + 1])
            real = batch['attention_mask'][i, t] != 0 and batch['attention_mask'][i, t + 1] != 0
            if real and target != -100:
                terms.append(-torch.log_softmax(logits[i, t].double(), dim=0)[target].item())
        total = sum(terms)
        losses.append(total / len(terms) if reduction == 'mean' and terms else total)
        counted.append(bool(terms))
    return losses, counted


@pytest.mark.parametrize('reduction', ['mean', 'sum'])
@pytest.mark.parametrize('huggingface', [False, True])
def test_the_per_sequence_loss_is_the_next_token_cross_entropy_by_hand(reduction, huggingface):
    batch = _token_batch()
    lm = TinyCausalLM(0)
    learner = HuggingFaceStyle(lm) if huggingface else lm
    with torch.no_grad():
        logits = lm(batch['input_ids'], batch['attention_mask'])
    expected, counted = _hand_losses(logits, batch, reduction)
    assert counted == [True, True, True, False, False, True, True, True, True, True]

    losses, has_tokens = sequence_losses(logits, batch['input_ids'],
                                         attention_mask=batch['attention_mask'],
                                         labels=batch['labels'], reduction=reduction)
    assert has_tokens.tolist() == counted
    torch.testing.assert_close(losses.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)

    scorer = LanguageModelScorer(learner, attention_mask_key='attention_mask',
                                 labels_key='labels', reduction=reduction,
                                 pass_attention_mask=True)
    scores = scorer(batch, batch['sample_id'], HARD_LEARNER)
    torch.testing.assert_close(scores.learner.double(), torch.tensor(expected).double(),
                               rtol=1e-5, atol=1e-5)
    assert scores.learner.dtype == torch.float32
    assert scores.excluded.tolist() == [not c for c in counted]
    assert scores.learner[3] == 0 and scores.learner[4] == 0


def test_without_labels_the_targets_are_the_token_ids_shifted():
    batch = _token_batch()
    logits = torch.randn(10, LENGTH, VOCAB, generator=torch.Generator().manual_seed(1))
    losses, counted = sequence_losses(logits, batch['input_ids'], reduction='sum')
    assert counted.all()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB),
                               batch['input_ids'][:, 1:].reshape(-1),
                               reduction='none').view(10, LENGTH - 1).sum(1)
    torch.testing.assert_close(losses, expected)
    # Labels equal to the ids give the same losses.
    same, _ = sequence_losses(logits, batch['input_ids'], labels=batch['input_ids'],
                              reduction='sum')
    torch.testing.assert_close(same, losses)


def test_half_precision_logits_are_scored_in_float32():
    batch = _token_batch()
    logits = torch.randn(10, LENGTH, VOCAB, generator=torch.Generator().manual_seed(2))
    exact, _ = sequence_losses(logits.bfloat16().float(), batch['input_ids'])
    half, _ = sequence_losses(logits.bfloat16(), batch['input_ids'])
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, exact)


def _select(scorer, batch, criterion, *, method='topk', b=4, seed=0) -> list[int]:
    config = SelectionConfig.create(batch_size=b, super_batch_size=len(batch['sample_id']),
                                    criterion=criterion, method=method, n_chunks=2, seed=seed)
    selection = SelectionStep(config, scorer).choose(batch, batch['sample_id'], 0, 0)
    return batch['sample_id'][selection.selected].tolist()


@pytest.mark.parametrize('method', ['topk', 'sample', 'joint'])
def test_a_sequence_with_no_counted_token_is_excluded_and_never_selected(method):
    batch = _token_batch()
    scorer = LanguageModelScorer(TinyCausalLM(0), TinyCausalLM(1),
                                 attention_mask_key='attention_mask', labels_key='labels')
    # easy_reference scores -loss(reference): a loss of 0 would make rows 3 and 4 the best
    # candidates of all, were they not excluded.
    scores = scorer(batch, batch['sample_id'], EASY_REFERENCE)
    assert scores.scores[3] == 0 and (scores.scores[~scores.excluded] < 0).all()
    for seed in range(20):
        chosen = _select(scorer, batch, 'easy_reference', method=method, b=8, seed=seed)
        assert len(set(chosen)) == 8 and not {103, 104} & set(chosen)
    # Only when too few others remain do they fill in.
    assert {103, 104} <= set(_select(scorer, batch, 'easy_reference', method=method, b=10))


def test_chunked_scoring_equals_unchunked():
    batch = _token_batch(n=11)
    kwargs = {'attention_mask_key': 'attention_mask', 'labels_key': 'labels'}
    whole = LanguageModelScorer(TinyCausalLM(0), TinyCausalLM(1), **kwargs)(
        batch, batch['sample_id'], LEARNABILITY)
    forward = lambda model, chunk: model(chunk['input_ids'])  # noqa: E731
    for chunk_size in (1, 4):
        for extra in ({}, {'forward': forward}):
            chunked = LanguageModelScorer(TinyCausalLM(0), TinyCausalLM(1),
                                          chunk_size=chunk_size, **kwargs, **extra)(
                batch, batch['sample_id'], LEARNABILITY)
            torch.testing.assert_close(chunked.scores, whole.scores, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(chunked.reference, whole.reference, rtol=1e-5, atol=1e-5)
            assert chunked.excluded.tolist() == whole.excluded.tolist()


def test_a_stored_reference_selects_what_the_live_one_selects():
    batch = _token_batch(n=24, seed=3)
    reference = TinyCausalLM(1)
    with torch.no_grad():
        stored, _ = sequence_losses(reference(batch['input_ids']), batch['input_ids'],
                                    attention_mask=batch['attention_mask'],
                                    labels=batch['labels'])
    batch['reference_loss'] = stored
    kwargs = {'attention_mask_key': 'attention_mask', 'labels_key': 'labels'}
    live = LanguageModelScorer(TinyCausalLM(0), reference, **kwargs)
    table = LanguageModelScorer(TinyCausalLM(0), ColumnReference(loss='reference_loss'),
                                **kwargs)
    torch.testing.assert_close(table(batch, batch['sample_id'], LEARNABILITY).scores,
                               live(batch, batch['sample_id'], LEARNABILITY).scores)
    for method in ('topk', 'joint', 'sample'):
        assert _select(live, batch, 'learnability', method=method, b=8) \
            == _select(table, batch, 'learnability', method=method, b=8)
    # easy_reference with a stored reference runs no model, and still excludes.
    easy = table(batch, batch['sample_id'], EASY_REFERENCE)
    assert easy.learner is None and easy.excluded[3] and easy.excluded[4]


# Through the loader, on real MDS shards of token sequences.

POOL = 192
SEQUENCE = 16


def _pattern(start: int, length: int) -> np.ndarray:
    """Counting up from ``start`` modulo the vocabulary: clean, predictable text."""
    return (start + np.arange(length)) % VOCAB


def _write_pool(directory: Path) -> tuple[Path, np.ndarray]:
    """Half clean sequences, half random tokens, interleaved at random, right-padded to
    lengths 13 to 16; each clean one is distinct."""
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    clean = rng.permutation(np.arange(POOL) % 2 == 0)
    columns = {'input_ids': f'ndarray:int64:{SEQUENCE}',
               'attention_mask': f'ndarray:int64:{SEQUENCE}', 'clean': 'int'}
    with MDSWriter(out=str(directory), columns=columns, size_limit=1 << 11) as writer:
        for i in range(POOL):
            length = SEQUENCE - (i // VOCAB) % 4
            ids = np.zeros(SEQUENCE, dtype=np.int64)
            ids[:length] = _pattern(i % VOCAB, length) if clean[i] \
                else rng.integers(0, VOCAB, length)
            mask = (np.arange(SEQUENCE) < length).astype(np.int64)
            writer.write({'input_ids': ids, 'attention_mask': mask, 'clean': int(clean[i])})
    return directory, clean


def _trained_on_clean_text(steps: int = 50) -> nn.Module:
    """A reference that has learnt to count: trained on clean sequences only."""
    model = TinyCausalLM(1, length=SEQUENCE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    text = torch.from_numpy(np.stack([_pattern(s, SEQUENCE) for s in range(VOCAB)]))
    for _ in range(steps):
        losses, _ = sequence_losses(model(text), text)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    return model.eval()


def _annotate(directory: Path, out: Path, reference: nn.Module) -> ReferenceCache:
    """A reference cache of the losses the scorer computes live, masks included."""
    scorer = LanguageModelScorer(TinyCausalLM(0, length=SEQUENCE), reference,
                                 attention_mask_key='attention_mask')
    annotate(out=out, model=reference, transform_id='token ids', local=directory,
             losses=scorer.losses, batch_size=48, num_workers=0, part_size=64,
             progress=False)
    return ReferenceCache(out, dataset=directory, model_checksum=model_checksum(reference),
                          transform='token ids')


def test_learnability_over_mds_token_shards_prefers_clean_text(tmp_path, make_streaming):
    directory, clean = _write_pool(tmp_path / 'pool')
    reference = _trained_on_clean_text()
    cache = _annotate(directory, tmp_path / 'pool.reference', reference)

    def run(ref, criterion: str = 'learnability') -> list[list[int]]:
        scorer = LanguageModelScorer(TinyCausalLM(0, length=SEQUENCE), ref,
                                     attention_mask_key='attention_mask', chunk_size=16)
        loader = SelectiveLoader(make_streaming(directory, batch_size=32, seed=5),
                                 batch_size=8, filter_ratio=0.75, scorer=scorer, seed=5,
                                 criterion=criterion)
        chosen = []
        for sub in loader:
            assert sub['input_ids'].shape == (8, SEQUENCE)
            assert sub['attention_mask'].shape == (8, SEQUENCE)
            chosen.append(sub['sample_id'].tolist())
        return chosen

    def clean_share(chosen: list[list[int]]) -> float:
        return float(clean[np.array(chosen).reshape(-1)].mean())

    # The cache holds what the live reference computes, sequence by sequence.
    ids = torch.arange(POOL)
    masked = make_streaming(directory, batch_size=POOL, shuffle=False)
    batch = {key: torch.from_numpy(np.stack([masked[i][key] for i in range(POOL)]))
             for key in ('input_ids', 'attention_mask')}
    with torch.no_grad():
        expected, _ = sequence_losses(reference(batch['input_ids']), batch['input_ids'],
                                      attention_mask=batch['attention_mask'])
    torch.testing.assert_close(torch.as_tensor(cache.outputs(batch, ids)['loss']), expected)
    live = run(reference)
    assert len(live) == POOL // 32
    assert clean_share(live) >= 0.9  # half of the pool is clean
    assert run(cache) == live
    # The reference steers: the untrained learner alone finds random tokens as hard.
    assert clean_share(run(None, 'hard_learner')) <= 0.6


# Bad input.

def _scorer(**kwargs) -> LanguageModelScorer:
    return LanguageModelScorer(TinyCausalLM(0), TinyCausalLM(1), **kwargs)


@pytest.mark.parametrize('forward, message', [
    (lambda model, batch: model(batch['input_ids'])[:, -1], r'forward= returned logits of '
     r'shape \(10, 16\); expected \[10, 12, V\]'),
    (lambda model, batch: model(batch['input_ids'])[:, :-1], r'forward= returned logits of '
     r'shape \(10, 11, 16\)'),
    (lambda model, batch: (model(batch['input_ids']),), r'forward= returned a tuple'),
    (lambda model, batch: model(batch['input_ids']).long(), r'dtype torch.int64'),
])
def test_logits_of_the_wrong_shape_name_forward(forward, message):
    batch = _token_batch()
    with pytest.raises(ScoreError, match=message):
        _scorer(forward=forward)(batch, batch['sample_id'], LEARNABILITY)


def test_logits_of_the_wrong_length_name_the_model():
    class Truncating(TinyCausalLM):
        def forward(self, input_ids, attention_mask=None):
            return super().forward(input_ids)[:, 1:]

    batch = _token_batch()
    with pytest.raises(ScoreError, match=r"the model \(called as model\(input_ids\) on "
                                         r"input_key='input_ids'\) returned logits of shape"):
        LanguageModelScorer(Truncating(0))(batch, batch['sample_id'], HARD_LEARNER)


def test_token_ids_out_of_range_name_the_column_and_the_samples():
    batch = _token_batch()
    batch['input_ids'][2, 5] = VOCAB
    batch['input_ids'][7, 0] = VOCAB + 3
    # With vocab_size, before the model sees them (its embedding could not take them).
    with pytest.raises(DataError, match=r"input_key='input_ids' holds token ids \[16, 19\] "
                                        r"outside \[0, 16\) for sample ids \[102, 107\]"):
        _scorer(vocab_size=VOCAB)(batch, batch['sample_id'], LEARNABILITY)
    batch = _token_batch()
    batch['input_ids'][9, 1] = -1
    with pytest.raises(DataError, match=r"input_key='input_ids' holds negative token ids "
                                        r"\[-1\] for sample ids \[109\]"):
        _scorer()(batch, batch['sample_id'], LEARNABILITY)


def test_labels_out_of_range_name_the_labels_column():
    batch = _token_batch()
    batch['labels'][1, 4] = VOCAB  # checked against the logits' V after the forward
    batch['labels'][6, 8] = VOCAB + 1
    with pytest.raises(DataError, match=r"labels_key='labels' holds token ids \[16, 17\] "
                                        r"outside \[0, 16\) \(only -100 may be, where "
                                        r"ignored\) for sample ids \[101, 106\] \(2 of 10\)"):
        _scorer(labels_key='labels')(batch, batch['sample_id'], LEARNABILITY)
    batch['labels'][5, 0] = -5  # before the forward
    with pytest.raises(DataError, match=r"labels_key='labels' holds negative token ids \[-5\] "
                                        r"\(only -100 may be, where ignored\) for sample ids "
                                        r"\[105\]"):
        _scorer(labels_key='labels')(batch, batch['sample_id'], LEARNABILITY)
    with pytest.raises(DataError, match=r'labels holds token ids \[-5, 16, 17\] outside '
                                        r'\[0, 16\) .* for rows \[1, 5, 6\]'):
        sequence_losses(torch.zeros(10, LENGTH, VOCAB), batch['input_ids'],
                        labels=batch['labels'])


@pytest.mark.parametrize('setting', ['input_key', 'attention_mask_key', 'labels_key'])
def test_a_missing_column_names_its_setting(setting):
    batch = _token_batch()
    with pytest.raises(MissingColumnError, match=rf"{setting}='tokens' names no column"):
        _scorer(**{setting: 'tokens'})(batch, batch['sample_id'], LEARNABILITY)


def test_columns_of_the_wrong_shape_or_dtype_are_refused():
    batch = _token_batch()
    batch['attention_mask'] = batch['attention_mask'][:, :-1]
    with pytest.raises(DataError, match=r"attention_mask_key='attention_mask' has shape "
                                        r"\(10, 11\) but the token ids have \(10, 12\)"):
        _scorer(attention_mask_key='attention_mask')(batch, batch['sample_id'], LEARNABILITY)
    batch = _token_batch()
    batch['input_ids'] = batch['input_ids'].float()
    with pytest.raises(DataError, match=r"input_key='input_ids' must hold integer token ids"):
        _scorer()(batch, batch['sample_id'], LEARNABILITY)


def test_a_stored_reference_without_losses_is_refused():
    batch = _token_batch()
    scorer = LanguageModelScorer(TinyCausalLM(0), ColumnReference(loss='reference_loss'))
    with pytest.raises(MissingColumnError, match=r"ColumnReference\(loss=...\)='reference_loss'"):
        scorer(batch, batch['sample_id'], LEARNABILITY)


@pytest.mark.parametrize('kwargs, message', [
    ({'pass_attention_mask': True}, r'pass_attention_mask=True needs attention_mask_key'),
    ({'pass_attention_mask': True, 'attention_mask_key': 'attention_mask',
      'forward': lambda model, batch: model(batch['input_ids'])}, r'with forward=\.\.\. pass'),
    ({'reduction': 'max'}, r"reduction='max' is not known; choose one of 'mean', 'sum'"),
    ({'chunk_size': 0}, r'chunk_size=0'),
    ({'vocab_size': 0}, r'vocab_size=0'),
])
def test_bad_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(SettingError, match=message):
        _scorer(**kwargs)


def test_every_error_is_a_jest_stream_error():
    for kind in (ScoreError, DataError, MissingColumnError, SettingError):
        assert issubclass(kind, JestStreamError)


def test_annotate_refuses_losses_beside_the_keys_or_not_callable(tmp_path):
    directory, _ = _write_pool(tmp_path / 'pool')
    reference = TinyCausalLM(1, length=SEQUENCE)
    scorer = LanguageModelScorer(TinyCausalLM(0, length=SEQUENCE), reference)
    common = {'out': tmp_path / 'cache', 'model': reference, 'transform_id': 'token ids',
              'local': directory, 'progress': False}
    with pytest.raises(SettingError, match='drop forward=, input_key= and target_key='):
        annotate(**common, losses=scorer.losses, target_key='input_ids')
    with pytest.raises(SettingTypeError, match='losses=.* must be callable'):
        annotate(**common, losses='mean')
    with pytest.raises(SettingError, match='losses=... computes outputs="loss"'):
        annotate(**common, losses=scorer.losses, outputs='embeddings')
    assert not (tmp_path / 'cache').exists()
