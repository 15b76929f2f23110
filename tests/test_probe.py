"""ProbeSet and parse_batch: batch forms, deterministic stratified draws, checkpoint round trip."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    DistributedSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
)

from lightning_interp.probe import (
    ParsedBatch,
    ProbeSet,
    ValidationScan,
    dataset_labels,
    parse_batch,
    sampled_indices,
)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(n, 3, 6, 6)


# --------------------------------------------------------------------------- parse_batch


@pytest.mark.parametrize("container", [tuple, list])
def test_parse_batch_inputs_and_labels(container):
    x, y = _images(), torch.tensor([0, 2, 1, 0])
    parsed = parse_batch(container([x, y]))
    assert parsed.inputs is x and parsed.labels is y and parsed.masks is None


def test_parse_batch_inputs_labels_and_mask():
    x, y = _images(), torch.tensor([0, 2, 1, 0])
    mask = torch.zeros(4, 6, 6, dtype=torch.long)
    mask[:, 1:3, 2:5] = 1
    parsed = parse_batch((x, y, mask))
    assert parsed.labels is y
    assert parsed.masks.dtype == torch.bool and torch.equal(parsed.masks, mask.bool())


def test_parse_batch_channel_mask_and_float_mask():
    x = _images()
    mask = torch.zeros(4, 1, 6, 6)
    mask[:, 0, :3] = 1.0
    parsed = parse_batch((x, torch.tensor([1, 1, 0, 0]), "some metadata", mask))
    assert parsed.masks.shape == (4, 6, 6)
    assert torch.equal(parsed.masks, mask[:, 0] > 0)


def test_parse_batch_ignores_items_that_are_not_labels_or_masks():
    x = _images()
    with pytest.warns(UserWarning, match="looks like masks"):  # said, not silently dropped
        parsed = parse_batch((x, torch.rand(3), torch.zeros(4, 5, 5)))  # not one value per sample, wrong-grid "mask"
    assert parsed.inputs is x and parsed.labels is None and parsed.masks is None


def test_parse_batch_dict():
    x, y = _images(), torch.tensor([3, 1, 2, 0])
    mask = torch.ones(4, 6, 6, dtype=torch.bool)
    parsed = parse_batch({"image": x, "label": y, "mask": mask, "filename": ["a", "b", "c", "d"]})
    assert parsed.inputs is x and parsed.labels is y and torch.equal(parsed.masks, mask)
    parsed = parse_batch({"pixel_values": x, "labels": y})
    assert parsed.inputs is x and parsed.labels is y and parsed.masks is None


def test_parse_batch_bare_tensor():
    x = _images()
    parsed = parse_batch(x)
    assert parsed.inputs is x and parsed.labels is None and parsed.masks is None


@pytest.mark.parametrize("batch", [{"pixels": torch.zeros(2, 3)}, "not a batch", (), [1, 2]])
def test_parse_batch_unknown_form_raises_type_error_naming_batch_parser(batch):
    with pytest.raises(TypeError, match="batch_parser") as info:
        parse_batch(batch)
    if isinstance(batch, dict):
        assert "'pixels'" in str(info.value), "the message shows what was found"


def test_parse_batch_uses_user_parser():
    x, y = _images(), torch.tensor([0, 1, 0, 1])
    batch = {"pixels": x, "meta": {"cls": y}}
    seen = []

    def parser(b):
        seen.append(b)
        return b["pixels"], b["meta"]["cls"]

    parsed = parse_batch(batch, parser)
    assert seen == [batch]
    assert parsed.inputs is x and parsed.labels is y and parsed.masks is None
    direct = parse_batch(batch, lambda b: ParsedBatch(b["pixels"]))
    assert direct.inputs is x and direct.labels is None
    assert parse_batch(batch, lambda b: b["pixels"]).inputs is x


# --------------------------------------------------------------------------- ProbeSet


def test_probe_set_copies_to_cpu_and_reports_contents():
    x, y = _images(), torch.tensor([0, 1, 0, 1])
    probe = ProbeSet(x, y)
    x.zero_()
    y.fill_(5)
    assert not torch.equal(probe.inputs, x) and probe.labels.tolist() == [0, 1, 0, 1]
    assert probe.inputs.device.type == "cpu" and probe.labels.dtype == torch.long
    assert len(probe) == 4 and probe.has_labels and not probe.has_masks
    assert "n=4" in repr(probe)


def test_probe_set_masks_are_squeezed_and_boolean():
    x = _images()
    masks = torch.zeros(4, 1, 6, 6)
    masks[:, :, 2:4, 2:4] = 1.0
    probe = ProbeSet(x, masks=masks)
    assert probe.has_masks and probe.masks.shape == (4, 6, 6) and probe.masks.dtype == torch.bool
    assert int(probe.masks.sum()) == 4 * 4


def test_probe_set_built_in_inference_mode_holds_normal_tensors():
    with torch.inference_mode():
        probe = ProbeSet(torch.randn(2, 3, 4, 4), torch.tensor([0, 1]))
    assert not probe.inputs.is_inference() and not probe.labels.is_inference()
    probe.inputs.requires_grad_(True)  # would raise for an inference tensor


@pytest.mark.parametrize(
    ("inputs", "labels", "masks"),
    [
        (torch.zeros(4), None, None),  # no sample dimension
        (torch.zeros(0, 3), None, None),  # empty
        ([[1.0, 2.0]], None, None),  # not a tensor
        (torch.zeros(4, 3, 6, 6), torch.tensor([0, 1, 2]), None),  # label count
        (torch.zeros(4, 3, 6, 6), torch.zeros(4, 2, 2), None),  # label rank
        (torch.zeros(4, 3, 6, 6), None, torch.zeros(3, 6, 6)),  # mask count
        (torch.zeros(4, 3, 6, 6), None, torch.zeros(4, 6)),  # mask rank
        (torch.zeros(4, 3, 6, 6), None, torch.zeros(4, 2, 6, 6)),  # multi-channel mask
    ],
)
def test_probe_set_rejects_bad_shapes(inputs, labels, masks):
    with pytest.raises(ValueError):
        ProbeSet(inputs, labels, masks)


def test_probe_set_state_dict_round_trip_through_torch_save():
    masks = torch.rand(5, 6, 6) > 0.5
    probe = ProbeSet(_images(5), torch.tensor([4, 3, 2, 1, 0]), masks)
    buffer = io.BytesIO()
    torch.save(probe.state_dict(), buffer)
    buffer.seek(0)
    restored = ProbeSet.from_state_dict(torch.load(buffer))
    assert torch.equal(restored.inputs, probe.inputs)
    assert torch.equal(restored.labels, probe.labels)
    assert torch.equal(restored.masks, probe.masks)

    bare = ProbeSet.from_state_dict(ProbeSet(_images(2)).state_dict())
    assert not bare.has_labels and not bare.has_masks


def test_probe_set_subset_takes_the_first_samples():
    probe = ProbeSet(_images(5), torch.tensor([4, 3, 2, 1, 0]), torch.ones(5, 6, 6))
    part = probe.subset(2)
    assert len(part) == 2 and part.labels.tolist() == [4, 3]
    assert torch.equal(part.inputs, probe.inputs[:2]) and part.masks.shape == (2, 6, 6)


# --------------------------------------------------------------------------- drawing a probe set


class _Indexed(Dataset):
    """Sample i is a 1x2x2 image filled with i; its label is labels[i]."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.full((1, 2, 2), float(index)), self.labels[index]


def _drawn_indices(probe: ProbeSet) -> list[int]:
    return probe.inputs[:, 0, 0, 0].long().tolist()


def _reference_stratified(labels: list[int], count: int) -> list[int]:
    """Per class in order, the earliest samples; each class gets its share round-robin; sorted by class."""
    per_class = {c: [i for i, label in enumerate(labels) if label == c] for c in sorted(set(labels))}
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(count, len(labels)):
        for indices in per_class.values():
            if depth < len(indices) and len(chosen) < count:
                chosen.append(indices[depth])
        depth += 1
    return sorted(chosen, key=lambda i: (labels[i], i))


def test_stratified_draw_from_shuffled_loader_is_deterministic_balanced_and_sorted():
    labels = [(7 * i) % 4 for i in range(40)]
    loader = DataLoader(_Indexed(labels), batch_size=6, shuffle=True, num_workers=0)
    first = ProbeSet.from_dataloader(loader, 8)
    torch.manual_seed(123)  # a different global seed would reshuffle the loader
    second = ProbeSet.from_dataloader(loader, 8)

    assert torch.equal(first.inputs, second.inputs) and torch.equal(first.labels, second.labels)
    assert first.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert _drawn_indices(first) == _reference_stratified(labels, 8)
    assert [labels[i] for i in _drawn_indices(first)] == first.labels.tolist()


def test_draw_does_not_change_global_rng_state():
    loader = DataLoader(_Indexed([i % 3 for i in range(30)]), batch_size=4, shuffle=True)
    before = torch.get_rng_state()
    ProbeSet.from_dataloader(loader, 6)
    assert torch.equal(torch.get_rng_state(), before)


def test_draw_from_iterable_of_batches_also_leaves_rng_alone():
    def batches():
        for start in range(0, 12, 4):
            torch.rand(1)  # a generator that consumes global randomness
            yield torch.arange(start, start + 4).float()[:, None], torch.arange(start, start + 4) % 2

    before = torch.get_rng_state()
    probe = ProbeSet.from_dataloader(batches(), 4)
    assert torch.equal(torch.get_rng_state(), before)
    assert probe.labels.tolist() == [0, 0, 1, 1]


def test_stratified_draw_with_a_rare_class():
    labels = [0, 0, 0, 0, 0, 1, 0, 0]
    probe = ProbeSet.from_batches([(torch.arange(8.0)[:, None], torch.tensor(labels))], 4)
    assert probe.inputs[:, 0].long().tolist() == [0, 1, 2, 5]
    assert probe.labels.tolist() == [0, 0, 0, 1]


def test_unstratified_draw_takes_the_first_samples_and_stops_reading():
    read = []

    def batches():
        for start in range(0, 100, 5):
            read.append(start)
            yield torch.arange(start, start + 5.0)[:, None], torch.arange(start, start + 5) % 3

    probe = ProbeSet.from_batches(batches(), 7, stratify=False)
    assert probe.inputs[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert read == [0, 5]


def test_stratified_draw_reads_at_most_pool_factor_times_samples():
    read = []

    def batches():
        for start in range(0, 100, 5):
            read.append(start)
            yield torch.arange(start, start + 5.0)[:, None], torch.arange(start, start + 5) % 5

    ProbeSet.from_batches(batches(), 2, pool_factor=4)
    assert read == [0, 5]


def test_draw_with_masks_and_user_parser():
    masks = torch.zeros(6, 2, 2, dtype=torch.bool)
    masks[:, 0, 0] = True
    data = [
        {"pix": torch.arange(i, i + 3.0)[:, None, None, None].expand(3, 1, 2, 2), "m": masks[i : i + 3]} for i in (0, 3)
    ]
    labels = torch.tensor([1, 0, 1, 0, 1, 0])

    probe = ProbeSet.from_batches(
        data, 4, batch_parser=lambda b: (b["pix"], labels[b["pix"][:, 0, 0, 0].long()], b["m"])
    )
    assert probe.labels.tolist() == [0, 0, 1, 1]
    assert probe.inputs[:, 0, 0, 0].long().tolist() == [1, 3, 0, 2]
    assert probe.has_masks and probe.masks.shape == (4, 2, 2)


def test_draw_from_empty_loader_and_bad_count_raise():
    with pytest.raises(ValueError, match="no batches"):
        ProbeSet.from_batches([], 3)
    with pytest.raises(ValueError, match="num_samples"):
        ProbeSet.from_batches([torch.zeros(2, 2)], 0)


def test_draw_without_labels_keeps_order():
    loader = DataLoader(TensorDataset(torch.arange(10.0)[:, None]), batch_size=3, shuffle=True)
    probe = ProbeSet.from_dataloader(loader, 4, batch_parser=lambda b: (b[0], None, None))
    assert probe.inputs[:, 0].tolist() == [0, 1, 2, 3] and not probe.has_labels


# --------------------------------------------------------------------------- what a loader validates on


class _Counted(Dataset):
    """Sample i is filled with i; counts every __getitem__; optionally lists its labels."""

    def __init__(self, labels: list[int], listed: bool = True) -> None:
        self._labels = labels
        self.reads = 0
        if listed:
            self.targets = list(labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int):
        self.reads += 1
        return torch.full((1, 2, 2), float(index)), self._labels[index]


def test_dataset_labels_from_lists_subsets_concats_and_tensor_datasets():
    assert dataset_labels(_Counted([2, 0, 1])).tolist() == [2, 0, 1]
    assert dataset_labels(_Counted([2, 0, 1], listed=False)) is None
    tensors = TensorDataset(torch.zeros(4, 2), torch.tensor([3, 1, 3, 0]))
    assert dataset_labels(tensors).tolist() == [3, 1, 3, 0]
    assert dataset_labels(TensorDataset(torch.zeros(4, 2), torch.rand(4))) is None  # float: not labels
    assert dataset_labels(Subset(tensors, [3, 0])).tolist() == [0, 3]
    assert dataset_labels(ConcatDataset([tensors, Subset(tensors, [1])])).tolist() == [3, 1, 3, 0, 1]
    transformed = _Counted([0, 1])
    transformed.target_transform = lambda y: y + 1  # the samples carry other labels than the list
    assert dataset_labels(transformed) is None
    wrong_length = _Counted([0, 1, 2])
    wrong_length.labels = ["cat", "dog"]  # class names, not per-sample labels
    assert dataset_labels(wrong_length).tolist() == [0, 1, 2]


def test_sampled_indices_honour_the_sampler_the_batch_limit_and_leave_every_rng_alone():
    data = TensorDataset(torch.arange(40.0))
    validation = [31, 3, 17, 8, 25, 12]
    generator = torch.Generator().manual_seed(5)
    loader = DataLoader(data, batch_size=2, sampler=SubsetRandomSampler(validation, generator=generator))
    before_generator, before_global = generator.get_state(), torch.get_rng_state()
    assert sampled_indices(loader).tolist() == sorted(validation)
    assert torch.equal(generator.get_state(), before_generator), "the sampler's own generator is restored"
    assert torch.equal(torch.get_rng_state(), before_global)
    assert set(sampled_indices(loader, limit_batches=1).tolist()) <= set(validation)
    assert len(sampled_indices(loader, limit_batches=1)) == 2
    sequential = DataLoader(data, batch_size=4)
    assert sampled_indices(sequential, limit_batches=2).tolist() == list(range(8))  # int: a batch count
    assert sampled_indices(sequential, limit_batches=0.25).tolist() == list(range(8))  # float: a fraction
    assert sampled_indices(sequential, limit_batches=1.0).tolist() == list(range(40))
    shard = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    assert sampled_indices(shard).tolist() == list(range(40)), "every rank's share: the whole validation set"


def test_scan_uses_the_label_list_reads_only_the_chosen_samples_and_draws_nested_sets():
    labels = [c for c in range(10) for _ in range(30)]  # class-sorted, like ImageFolder
    data = _Counted(labels)
    scan = ValidationScan(DataLoader(data, batch_size=16))
    assert scan.labels_from == "the dataset's label list" and data.reads == 0
    small, large = scan.select(10), scan.select(40)
    assert set(small.tolist()) <= set(large.tolist()), "a smaller draw is part of a larger one"
    probe = scan.load(large)
    assert sorted(probe.labels.tolist()) == sorted([c for c in range(10) for _ in range(4)])
    assert data.reads == 40
    scan.load(small)
    assert data.reads == 40, "samples already read are not read again"
    assert probe.indices.tolist() == large.tolist()
    assert probe.inputs[:, 0, 0, 0].long().tolist() == large.tolist(), "sample i is the dataset's sample i"


def test_scan_without_a_label_list_reads_each_sample_once():
    data = _Counted([i % 3 for i in range(30)], listed=False)
    scan = ValidationScan(DataLoader(data, batch_size=8))
    assert scan.labels_from == "one pass over the validation samples"
    probe = scan.load(scan.select(6))
    assert probe.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.reads == 30, "one pass, and the chosen samples come from it"


def test_a_batch_parser_is_trusted_over_the_label_list():
    data = _Counted([0, 1, 2, 3])  # lists labels 0..3, but the parser says otherwise
    scan = ValidationScan(DataLoader(data, batch_size=2), batch_parser=lambda b: (b[0], b[1] % 2, None))
    assert scan.labels.tolist() == [0, 1, 0, 1]


def test_probe_state_by_index_is_small_and_the_fingerprint_detects_other_samples():
    data = _Counted([0, 1] * 10)
    scan = ValidationScan(DataLoader(data, batch_size=4))
    probe = scan.load(scan.select(4))
    state = probe.state_dict(by_index=True)
    assert set(state) == {"indices", "fingerprint", "labels"}
    again = scan.load(state["indices"])
    assert again.matches(state["fingerprint"])
    other = ProbeSet(again.inputs + 1)
    assert not other.matches(state["fingerprint"])
    with pytest.raises(ValueError, match="indices"):
        ProbeSet.from_state_dict(state)
    full = probe.state_dict()
    assert torch.equal(ProbeSet.from_state_dict(full).indices, probe.indices)


def test_an_empty_validation_selection_is_a_clear_error():
    data = TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="no samples"):
        ProbeSet.from_dataloader(DataLoader(data, batch_size=2, sampler=SubsetRandomSampler([])), 2)
    assert len(ProbeSet.from_dataloader(DataLoader(data, sampler=SequentialSampler(data)), 2)) == 2


def test_sampled_indices_under_lightnings_distributed_wrapper_and_a_shuffled_distributed_sampler():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    data = TensorDataset(torch.arange(100.0))
    # Lightning wraps a user's SubsetRandomSampler(val_idx) for DDP: its dataset lists sampler positions
    wrapped = DistributedSamplerWrapper(SubsetRandomSampler(list(range(80, 100))), num_replicas=2, rank=0)
    assert sampled_indices(DataLoader(data, batch_size=4, sampler=wrapped)).tolist() == list(range(80, 100))

    shuffled = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, seed=3)
    found = sampled_indices(DataLoader(data, batch_size=4, sampler=shuffled), limit_batches=2)
    expected = set()
    for rank in range(2):  # what each rank validates on within two batches
        expected |= set(list(DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=3))[:8])
    assert set(found.tolist()) == expected and len(expected) == 16


def test_sequence_masks_mark_tokens_and_an_integer_attention_mask_is_not_one():
    from lightning_interp.probe import ProbeSet, parse_batch

    ids = torch.randint(1, 9, (4, 6))
    keywords = torch.zeros(4, 6, dtype=torch.bool)
    keywords[:, 2] = True
    attention_mask = torch.ones(4, 6, dtype=torch.long)
    labels = torch.tensor([0, 1, 0, 1])
    assert torch.equal(parse_batch((ids, labels, keywords)).masks, keywords)
    assert parse_batch((ids, labels, attention_mask)).masks is None  # 1/0 integers: padding, not evidence
    signals = torch.randn(4, 2, 6)
    assert torch.equal(parse_batch((signals, labels, keywords)).masks, keywords)  # one flag per time step
    assert ProbeSet(ids, labels, keywords).masks.shape == (4, 6)
    with pytest.raises(ValueError, match=r"\(4, 6\) \(one flag per token"):
        ProbeSet(ids, labels, keywords[:, :5])


def test_a_tuple_batchs_integer_second_item_shaped_like_token_ids_is_their_attention_mask():
    ids = torch.randint(1, 9, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    y = torch.tensor([0, 1, 0])
    parsed = parse_batch((ids, mask, y))
    assert parsed.extras is not None and parsed.extras["attention_mask"] is mask
    assert parsed.labels.tolist() == [0, 1, 0] and parsed.masks is None
    # not an attention mask: a boolean (B, T) item (an object mask), values other than 0/1, no labels after it,
    # float inputs (a signal, not token ids)
    for batch in (
        (ids, mask.bool(), y),
        (ids, mask * 2, y),
        (ids, mask),
        (ids.float(), mask, y),
    ):
        assert parse_batch(batch).extras is None, [tuple(item.shape) for item in batch]
