"""Dataset readers on fixtures written here in the real on-disk formats."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from concept_attention.segmentation.datasets import (
    IGNORE_LABEL, DatasetError, DatasetNotFoundError, FolderDataset, ImageNetSegmentation, PascalVOC, load_dataset,
    resize_mask,
)

REPO = Path(__file__).resolve().parents[1]


# ---- ImageNet-Segmentation: MATLAB v7.3 (HDF5) with object references -------------------------------------------

def write_gtsegs_mat(path, items):
    """items: (image id, (H, W, 3) uint8, (H, W) bool). Stored like MATLAB: column-major -> transposed arrays,
    cells as N x 1 reference datasets, gt cells holding a 1x1 reference to the mask."""
    ref = h5py.special_dtype(ref=h5py.Reference)
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        ids, imgs, gts = (np.empty((len(items), 1), dtype=object) for _ in range(3))
        for i, (name, image, mask) in enumerate(items):
            code_units = np.array([[ord(c)] for c in name], dtype=np.uint16)          # (L, 1) UTF-16
            ids[i, 0] = refs.create_dataset(f"id{i}", data=code_units).ref
            imgs[i, 0] = refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0)).ref    # (3, W, H)
            mask_ref = refs.create_dataset(f"mask{i}", data=mask.T.astype(np.uint8)).ref     # (W, H)
            holder = refs.create_dataset(f"gt{i}", shape=(1, 1), dtype=ref)
            holder[0, 0] = mask_ref
            gts[i, 0] = holder.ref
        group = f.create_group("value")
        for key, values in (("id", ids), ("img", imgs), ("gt", gts)):
            group.create_dataset(key, data=values, dtype=ref)


def test_imagenet_seg_reader(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)     # H != W catches a missing transpose
    mask = np.zeros((5, 7), bool)
    mask[1:4, 2:6] = True
    # n02123045 is ImageNet's "tabby, tabby cat"; n02690373 is "airliner"
    write_gtsegs_mat(tmp_path / "gtsegs_ijcv.mat", [("n02123045_1234", image, mask),
                                                  ("n02690373_77", image[::-1].copy(), ~mask)])
    data = ImageNetSegmentation(tmp_path)                  # a folder holding the file works too
    assert len(data) == 2
    first = data[0]
    assert first.image_id == "n02123045_1234"
    assert np.array_equal(np.asarray(first.image), image)
    assert first.mask.dtype == np.int64 and np.array_equal(first.mask, mask.astype(np.int64))
    assert first.class_names == ["background", "cat"]      # tabby -> cat via the shipped class map
    second = data[1]
    assert second.class_names == ["background", "plane"] and np.array_equal(second.mask, (~mask).astype(np.int64))
    assert np.array_equal(np.asarray(second.image), image[::-1])


def test_imagenet_seg_unknown_wnid_and_bad_file(tmp_path):
    write_gtsegs_mat(tmp_path / "a.mat", [("n99999999_1", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), bool))])
    with pytest.raises(DatasetError, match="n99999999.*build_wnid_table"):
        ImageNetSegmentation(tmp_path / "a.mat")[0]
    (tmp_path / "b.mat").write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(DatasetError, match="not a MATLAB v7.3"):
        ImageNetSegmentation(tmp_path / "b.mat")
    with pytest.raises(DatasetNotFoundError, match="gtsegs_ijcv.mat"):
        ImageNetSegmentation(tmp_path / "missing")


def test_shipped_wnid_table_covers_the_class_map():
    lemmas = json.loads((REPO / "concept_attention/data/wnid_to_lemma.json").read_text())
    categories = json.loads((REPO / "concept_attention/data/imagenet_seg_class_map.json").read_text())["categories"]
    assert set(lemmas.values()) == set(categories)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in lemmas)


def test_wnid_table_builder_uses_byte_offsets(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_wnid_table", REPO / "scripts/build_wnid_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    header = b"  1 This software and database is being provided\n"
    first = f"{len(header):08d} 05 n 02 tabby 0 tabby_cat 0 000 | a cat\n".encode()
    second = f"{len(header) + len(first):08d} 06 n 01 Homo_sapiens 0 000 | people\n".encode()
    (tmp_path / "data.noun").write_bytes(header + first + second)
    assert module.read_first_lemmas(tmp_path / "data.noun") == {
        f"n{len(header):08d}": "tabby", f"n{len(header) + len(first):08d}": "Homo sapiens"}
    (tmp_path / "bad.noun").write_bytes(b"00000005 05 n 01 x 0 000 | wrong offset\n")
    with pytest.raises(ValueError, match="byte"):
        module.read_first_lemmas(tmp_path / "bad.noun")


# ---- PascalVOC 2012 ------------------------------------------------------------------------------------------

def voc_palette():
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(8):
            r |= ((c >> 0) & 1) << (7 - shift)
            g |= ((c >> 1) & 1) << (7 - shift)
            b |= ((c >> 2) & 1) << (7 - shift)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_voc(root, masks):
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for image_id, mask in masks.items():
        Image.fromarray(np.full(mask.shape + (3,), 128, np.uint8)).save(voc / "JPEGImages" / f"{image_id}.jpg")
        png = Image.fromarray(mask.astype(np.uint8), mode="P")
        png.putpalette(voc_palette())
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(masks) + "\n")
    return voc


def voc_masks():
    single = np.zeros((300, 400), np.int64)
    single[50:200, 100:300] = 8                      # cat
    single[49, 100:300] = IGNORE_LABEL                # the object border
    double = single.copy()
    double[220:290, 10:90] = 12                      # and a dog
    sliver = single.copy()
    sliver[0, 1] = 12                                # one dog pixel that no 224 nearest sample hits
    return {"2007_000001": single, "2007_000002": double, "2007_000003": sliver}


def test_voc_multi_and_single_split(tmp_path):
    masks = voc_masks()
    assert 12 not in resize_mask(masks["2007_000003"], 224)      # the fixture's premise
    voc = write_voc(tmp_path, masks)
    multi = load_dataset("voc-multi", tmp_path / "VOCdevkit")   # VOCdevkit or VOC2012 both work
    assert len(multi) == 3
    sample = multi[1]
    assert np.array_equal(sample.mask, masks["2007_000002"])      # palette indices, 255 kept
    assert sample.class_names[8] == "cat" and sample.class_names[12] == "dog" and sample.class_names[1] == "plane"
    assert sample.present_labels() == [8, 12] and sample.image.mode == "RGB"

    single = PascalVOC(voc, single_class=True)
    assert single.ids == ["2007_000001", "2007_000003"]
    for index, image_id in enumerate(single.ids):
        sample = single[index]
        expected = np.where(masks[image_id] == IGNORE_LABEL, IGNORE_LABEL, (masks[image_id] == 8).astype(np.int64))
        assert sample.class_names == ["background", "cat"]
        assert np.array_equal(sample.mask, expected)


def test_voc_missing_tree(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="VOC2012"):
        PascalVOC(tmp_path)


# ---- plain folder --------------------------------------------------------------------------------------------

def write_folder(root, n=2):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.csv").write_text("label,name\n0,background\n1,cat\n2,dog\n")
    for i in range(n):
        Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(root / "images" / f"img{i}.png")
        mask = np.zeros((6, 8), np.uint8)
        mask[1:3, 2:5] = 1 + i
        mask[5, :] = IGNORE_LABEL
        Image.fromarray(mask, mode="L").save(root / "masks" / f"img{i}.png")


def test_folder_dataset(tmp_path):
    write_folder(tmp_path)
    data = FolderDataset(tmp_path)
    assert len(data) == 2 and data.class_names == ["background", "cat", "dog"]
    sample = data[1]
    assert sample.image_id == "img1" and sample.image.size == (8, 6)
    assert sample.present_labels() == [2] and (sample.mask[5] == IGNORE_LABEL).all()


def test_folder_dataset_errors(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "masks" / "img1.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="mask for image img1.png"):
        FolderDataset(tmp_path)
    write_folder(tmp_path / "b")
    (tmp_path / "b" / "classes.csv").write_text("id,name\n0,background\n")
    with pytest.raises(DatasetError, match="label,name"):
        FolderDataset(tmp_path / "b")
    write_folder(tmp_path / "c")
    Image.fromarray(np.full((6, 8), 7, np.uint8), mode="L").save(tmp_path / "c" / "masks" / "img0.png")
    with pytest.raises(DatasetError, match=r"labels \[7\] not in classes.csv"):
        FolderDataset(tmp_path / "c")[0]


def test_unknown_dataset_name():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("coco", "x")
