"""A tiny, learnable detection dataset in COCO layout (red squares and green discs on noise),
for checks on a machine with no data: the tests and the GPU check train and evaluate on it."""
import json
from pathlib import Path

import torch
from torchvision.io import write_png

CLASSES = ["square", "disc"]


def _image(generator: torch.Generator, size: int, objects: int) -> tuple[torch.Tensor, list[dict]]:
    image = (torch.rand(3, size, size, generator=generator) * 60).to(torch.uint8)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    annotations = []
    for _ in range(objects):
        side = int(torch.randint(size // 5, size // 3, (), generator=generator))
        x, y = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
        category = int(torch.randint(0, len(CLASSES), (), generator=generator))
        if category == 0:
            image[:, y:y + side, x:x + side] = torch.tensor([220, 40, 40], dtype=torch.uint8)[:, None, None]
        else:
            radius = side / 2
            inside = (xs - x - radius + 0.5) ** 2 + (ys - y - radius + 0.5) ** 2 <= radius ** 2
            image[:, inside] = torch.tensor([40, 220, 40], dtype=torch.uint8)[:, None]
        annotations.append({"bbox": [x, y, side, side], "category_id": category + 1})
    return image, annotations


def write_synthetic_coco(root: Path, images_per_split: dict[str, int], size: int = 128, seed: int = 0
                         ) -> dict[str, tuple[Path, Path]]:
    """Write `<root>/<split>/*.png` and `<root>/<split>.json`; returns split -> (json, image dir)."""
    generator = torch.Generator().manual_seed(seed)
    layout = {}
    next_id = 1
    for split, count in images_per_split.items():
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        coco = {"images": [], "annotations": [],
                "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]}
        for index in range(count):
            image, annotations = _image(generator, size, objects=1 + index % 2)
            file_name = f"{split}-{index:03d}.png"
            write_png(image, str(image_dir / file_name))
            image_id = 1000 + index
            coco["images"].append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for annotation in annotations:
                w, h = annotation["bbox"][2:]
                coco["annotations"].append({**annotation, "id": next_id, "image_id": image_id,
                                            "area": w * h, "iscrowd": 0})
                next_id += 1
        json_path = root / f"{split}.json"
        json_path.write_text(json.dumps(coco))
        layout[split] = (json_path, image_dir)
    return layout


def coco_settings(root: Path | str) -> list[str]:
    """The data.* overrides that read a `write_synthetic_coco` folder with train and val splits,
    val as the test split too."""
    return ["data.dataset=coco", f"data.root={root}", "data.annotations={train: train.json, val: val.json}",
            "data.images={train: train, val: val}", "data.test_split=val"]
