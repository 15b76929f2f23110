"""Argument errors at construction, trainer-dependent errors at setup, each saying how to fix it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import DataDescription, Display, GradCAMCallback, ProbeSet, SaliencyCallback
from tests.conftest import quiet_trainer, tiny_classifier, tiny_datamodule


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: SaliencyCallback(num_samples=0), "num_samples"),
        (lambda: SaliencyCallback(every_n_epochs=0), "every_n_epochs"),
        (lambda: SaliencyCallback(every_n_epochs=-2), "every_n_epochs"),
        (lambda: SaliencyCallback(target="best"), "target"),
        (lambda: SaliencyCallback(target=-1), "target"),
        (lambda: SaliencyCallback(methods=("gradient", "anchors")), "anchors"),
        (lambda: SaliencyCallback(methods=()), "method"),
        (lambda: SaliencyCallback(channel_reduction="mean"), "channel_reduction"),
        (lambda: SaliencyCallback(display=Display(cmap="no-such-map")), "colormap"),
        (lambda: GradCAMCallback(layer=[]), "layer"),
        (lambda: GradCAMCallback(layer=["auto", "net.4"]), "auto"),
        (lambda: GradCAMCallback(name="a/b"), "name"),
        (lambda: GradCAMCallback(target="label", probe=ProbeSet(torch.zeros(2, 3, 8, 8))), "labels"),
    ],
)
def test_bad_arguments_fail_at_construction(factory, message):
    with pytest.raises((ValueError, TypeError), match=message):
        factory()


def test_unknown_layer_fails_at_setup_and_suggests_the_closest(tmp_path):
    trainer = quiet_trainer(tmp_path, callbacks=[GradCAMCallback(layer="net.44")], logger=False)
    with pytest.raises(ValueError, match=r"'net\.4'"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())


def test_layer_without_spatial_output_is_refused_at_setup(tmp_path):
    trainer = quiet_trainer(tmp_path, callbacks=[GradCAMCallback(layer="net.10")], logger=False)  # the Linear head
    with pytest.raises(ValueError, match="spatial"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())


class TabularClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tabular_loader():
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 5, generator=generator), torch.randint(2, (32,), generator=generator))
    return DataLoader(data, batch_size=8)


def test_gradcam_auto_on_a_model_without_spatial_layers_fails_at_setup(tmp_path):
    trainer = quiet_trainer(tmp_path, callbacks=[GradCAMCallback()], logger=False)
    with pytest.raises(ValueError, match="SaliencyCallback"):
        trainer.fit(TabularClassifier(), _tabular_loader(), _tabular_loader())


def test_saliency_on_tabular_inputs_works(tmp_path):
    callback = SaliencyCallback(methods=("gradient", "integrated_gradients"), num_samples=4)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    trainer.fit(TabularClassifier(), _tabular_loader(), _tabular_loader())
    assert callback._runs == 1
    assert callback._previous["gradient"].shape == (4, 5)
    assert list((tmp_path / "interp_images").rglob("*.png"))


def test_no_validation_data_is_a_clear_setup_error(tmp_path):
    trainer = quiet_trainer(tmp_path, callbacks=[SaliencyCallback()], logger=False)
    with pytest.raises(ValueError, match="validation dataloader"):
        trainer.fit(TabularClassifier(), _tabular_loader())


def test_label_target_without_labels_in_the_data_is_a_clear_error(tmp_path):
    images = TensorDataset(torch.rand(16, 3, 16, 16))
    trainer = quiet_trainer(tmp_path, callbacks=[SaliencyCallback(target="label")], logger=False)
    with pytest.raises(ValueError, match="labels"):
        trainer.validate(tiny_classifier(), DataLoader(images, batch_size=8))


def test_unknown_batch_form_names_what_it_found(tmp_path):
    class Odd(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {"picture": torch.rand(3, 16, 16)}

    trainer = quiet_trainer(tmp_path, callbacks=[SaliencyCallback()], logger=False)
    with pytest.raises(TypeError, match=r"picture.*batch_parser"):
        trainer.validate(tiny_classifier(), DataLoader(Odd(), batch_size=4))


def test_batch_parser_handles_an_unusual_form(tmp_path):
    class Odd(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {"picture": torch.rand(3, 16, 16), "kind": index % 4}

    callback = SaliencyCallback(
        num_samples=4, target="label", data=DataDescription(batch_parser=lambda b: (b["picture"], b["kind"], None))
    )
    trainer = quiet_trainer(tmp_path, callbacks=[callback], logger=False)
    model = tiny_classifier()
    model.validation_step = lambda batch, batch_idx: None
    trainer.validate(model, DataLoader(Odd(), batch_size=4))
    assert callback.probe is not None and callback.probe.labels.tolist() == [0, 1, 2, 3]


def test_num_samples_larger_than_the_validation_set_warns_and_uses_all(tmp_path):
    callback = GradCAMCallback(num_samples=100)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    with pytest.warns(UserWarning, match="holds only 32"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    assert len(callback.probe) == 32


class SequenceClassifier(TabularClassifier):
    """1-D sequences (batch, channels, length) through a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 2)
        )


def test_saliency_on_one_dimensional_sequences_works(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 2, 12, generator=generator), torch.randint(2, (32,), generator=generator))
    callback = SaliencyCallback(methods=("gradient", "smoothgrad"), num_samples=4)
    trainer = quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback], logger=False)
    trainer.fit(SequenceClassifier(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert callback._runs == 1
    assert callback._previous["smoothgrad"].shape == (4, 2, 12)  # a channels x length heatmap per sample
    assert list((tmp_path / "interp_images").rglob("*.png"))


def test_messages_name_what_was_found(tmp_path):
    with pytest.raises(TypeError, match="dotted module names"):
        GradCAMCallback(layer=nn.Conv2d(3, 3, 3))
    trainer = quiet_trainer(tmp_path, callbacks=[SaliencyCallback()], logger=False)
    with pytest.raises(ValueError) as caught:
        trainer.fit(TabularClassifier(), _tabular_loader())
    assert "TrainerFn" not in str(caught.value) and "trainer.fit()" in str(caught.value)


def test_two_callbacks_with_one_name_are_refused(tmp_path):
    # Lightning refuses two callbacks with one state_key in Trainer.__init__ (public behaviour we rely on: this
    # fails loudly if a Lightning release stops checking) ...
    with pytest.raises(RuntimeError, match=r"GradCAMCallback.*state_key"):
        quiet_trainer(tmp_path, callbacks=[GradCAMCallback(layer="net.0"), GradCAMCallback(layer="net.3")])
    # ... and a callback added to trainer.callbacks later is refused at setup, with what to do
    trainer = quiet_trainer(tmp_path, callbacks=[GradCAMCallback(layer="net.0")], logger=False, max_epochs=1)
    trainer.callbacks.append(GradCAMCallback(layer="net.3"))
    with pytest.raises(ValueError, match=r"Two GradCAMCallbacks named 'gradcam'.*name='gradcam_2'"):
        trainer.fit(tiny_classifier(), datamodule=tiny_datamodule())
    trainer = quiet_trainer(
        tmp_path, callbacks=[GradCAMCallback(layer="net.0"), GradCAMCallback(layer="net.3", name="gradcam_late")]
    )
    keys = [callback.state_key for callback in trainer.callbacks if isinstance(callback, GradCAMCallback)]
    assert len(set(keys)) == 2


def test_saliency_methods_from_the_registry_with_their_own_options():
    callback = SaliencyCallback(methods=["gradient", ("smoothgrad", {"n_samples": 3, "noise_level": 0.1})])
    assert callback.methods == ("gradient", "smoothgrad")
    assert callback.method_options == {"smoothgrad": {"n_samples": 3, "noise_level": 0.1}}
    with pytest.raises(ValueError, match="'grad_cam' is for GradCAMCallback"):
        SaliencyCallback(methods=["grad_cam"])
    with pytest.raises(TypeError, match=r"smoothgrad takes no option\(s\) \['steps'\]"):
        SaliencyCallback(methods=[("smoothgrad", {"steps": 3})])
    with pytest.raises(ValueError, match="lists 'gradient' twice"):
        SaliencyCallback(methods=["gradient", ("gradient", {})])
    mapping = SaliencyCallback(methods={"gradient": None, "integrated_gradients": {"n_steps": 5}})
    assert mapping.methods == ("gradient", "integrated_gradients")
    assert mapping.method_options == {"integrated_gradients": {"n_steps": 5}}
    with pytest.raises(TypeError, match="ig_steps"):  # the 0.1 spellings are gone in 0.2
        SaliencyCallback(methods=("integrated_gradients",), ig_steps=5)


def test_saliency_passes_each_methods_own_options_to_it():
    from lightning_interp.methods import attribution_to_map, smoothgrad

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x = torch.rand(2, 3, 6, 6)
    callback = SaliencyCallback(methods=[("smoothgrad", {"n_samples": 3, "noise_level": 0.3})], seed=5)
    maps = callback._explain(model, x, None).maps["smoothgrad"]
    target = model(x).argmax(dim=1)
    expected = smoothgrad(model, x, target, n_samples=3, noise_level=0.3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(maps, attribution_to_map(expected, "abs_sum"))
