"""The paper's recipes load, differ from their focal twins only in the loss, and train a few
steps on CPU at reduced size."""
from pathlib import Path

import pytest
import torch

from pipeline.config import flatten, load_config
from pipeline.data.sources import VOC2007_FOLDER, VOC2012_FOLDER, VOC_LAYOUTS, check_splits
from pipeline.model import build_model
from pipeline.training.loop import Training, seed_everything

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*_ap.yaml"))


def test_every_recipe_has_a_focal_twin():
    assert len(RECIPES) == 4
    for recipe in RECIPES:
        ap = flatten(load_config(recipe))
        focal = flatten(load_config(recipe.with_name(recipe.name.replace("_ap.yaml", "_focal.yaml"))))
        differing = {key for key in ap if ap[key] != focal[key]}
        assert differing == {"loss.classification", "run.name"}, recipe.name
        assert (ap["loss.classification"], focal["loss.classification"]) == ("ap", "focal")
        check_splits(load_config(recipe).data)  # the dataset has the splits the recipe names


def test_voc_recipes_train_on_07_plus_12_and_test_on_voc2007():
    voc = [recipe for recipe in RECIPES if "_voc" in recipe.name]
    assert len(voc) == 3
    for recipe in voc:
        data = load_config(recipe).data
        assert (data.dataset, data.train_split, data.test_split) == ("voc0712", "trainval", "test")
        assert VOC_LAYOUTS["voc0712"].splits[data.train_split] == (VOC2007_FOLDER, VOC2012_FOLDER)
        assert VOC_LAYOUTS["voc0712"].splits[data.test_split] == (VOC2007_FOLDER,)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_trains_a_few_steps_on_cpu(recipe):
    size = 96
    # RetinaNet trains at a reduced size here; SSD only takes its own fixed input size.
    reduced = [] if recipe.name.startswith("ssd") else [f"train.input_size={size}"]
    config = load_config(recipe, ["model.min_size=96", "model.max_size=96", *reduced, "train.batch_size=2",
                                  "ray.workers=1", "ray.use_gpu=false", "train.amp=false"])
    seed_everything(0)
    model = build_model(config, num_classes=20)
    training = Training(config, model, torch.device("cpu"), steps=10)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[0.2, 0.2, 0.6, 0.7]]) * size, "labels": torch.tensor([3])} for _ in images]
    losses = [training.train_step(images, targets)["loss"] for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert config.train.augment == "ssd"


def test_the_longer_bccd_recipe_is_the_main_job_s_but_for_its_levers():
    main_job = flatten(load_config(None, []))
    longer = flatten(load_config(RECIPES[0].parent / "bccd_long.yaml", []))
    changed = {key: longer[key] for key in main_job if longer[key] != main_job[key]}
    fitted_at_half = [[22.64, 32.02], [45.28, 64.04], [90.56, 128.07], [181.12, 256.14], [362.24, 512.28]]
    assert changed == {"train.epochs": 39, "train.vflip": 0.5, "train.mosaic": 0.5, "train.cpu_amp": True,
                       "model.fg_iou": 0.6, "model.bg_iou": 0.5, "model.anchors.mode": "explicit",
                       "model.anchors.sizes": fitted_at_half, "model.anchors.ratios": [[0.5, 1.0, 2.0]] * 5,
                       "run.name": "bccd-long"}


def test_the_bccd_pbt_sweep_is_the_main_job_s_recipe_with_a_population():
    main_job = flatten(load_config(None, []))
    pbt = load_config(RECIPES[0].parent / "bccd_pbt.yaml", [])
    changed = {key for key, value in flatten(pbt).items() if value != main_job[key]}
    assert {key for key in changed if not key.startswith("tune.")} == {"train.eval_every", "run.name"}
    assert pbt.tune.scheduler == "pbt" and pbt.tune.perturbation_interval % pbt.train.eval_every == 0
