import torch

from pipeline.robustness import PerturbedDataset, Setting, add_noise, occlude


def test_occlusion_blacks_out_the_given_fraction_of_each_box():
    image = torch.ones(3, 60, 60)
    occluded = occlude(image, torch.tensor([[10.0, 10.0, 30.0, 50.0]]), fraction=0.25)
    dark = occluded[0] == 0
    assert dark.sum() == 10 * 20  # half the width and half the height, centred
    assert dark[20:40, 15:25].all()
    assert torch.equal(image, torch.ones(3, 60, 60))  # the input is untouched


def test_noise_is_seeded_and_has_the_asked_spread():
    image = torch.full((3, 200, 200), 0.5)
    first = add_noise(image, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(first, add_noise(image, 0.1, torch.Generator().manual_seed(1)))
    assert abs((first - 0.5).std().item() - 0.1) < 0.005


class _Images:
    def __len__(self):
        return 2

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return torch.rand(3, 32, 32, generator=generator), {"boxes": torch.tensor([[4.0, 4.0, 20.0, 20.0]])}, index


def test_perturbed_images_are_the_same_for_every_model():
    for setting in [Setting("noise", "noise", 0.2), Setting("coco-c", "gaussian_noise", 3)]:
        dataset = PerturbedDataset(_Images(), setting, seed=7)
        assert torch.equal(dataset[1][0], PerturbedDataset(_Images(), setting, seed=7)[1][0])
        assert not torch.equal(dataset[1][0], _Images()[1][0])
    clean = PerturbedDataset(_Images(), Setting("clean", "clean", 0.0))
    assert torch.equal(clean[0][0], _Images()[0][0])
