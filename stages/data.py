"""Data stage: the image-caption dataset folder and the initial backbone checkpoint.

Reads   --params FILE (sections seed, data, backbone, downloads, model.img_feature_dim)
        data.source synthetic: generates the shapes world (data.n_train, n_val, n_test, captions_per_image,
            image_size, min_objects, max_objects, background_noise, single_1k_size are read only here)
        data.source coco: fetches the Karpathy split, the COCO 2014 caption and instance annotations, VinVL's
            test_img_keys_1k.tsv (unless downloads.vinvl_test_img_keys_1k has no URL) and, with
            data.coco_images, the train2014/val2014 images, per the downloads catalogue (aladin/download.py,
            aladin/coco.py); the synthetic-only keys above are ignored
Writes  --out DIR             images/, dataset_coco.json (Karpathy split), annotations/captions.json and
                              annotations/instances.json (COCO formats), see aladin/data.py; test_img_keys_1k.tsv,
                              the test images of the vinvl_1k protocol (synthetic: data.single_1k_size drawn from
                              the seed; coco: VinVL's, checked against the Karpathy test split)
        --backbone-out DIR    optional: the initial backbone in the VinVL/Oscar layout (config.json, vocab.txt,
                              weights) per backbone.init: random (vocabulary = every caption word and tag),
                              vinvl (the coco_ir checkpoint, checked and copied) or bert-base-uncased
                              (converted, image layers from the seed); see aladin/bert_init.py
Run     python -m stages.data --params params.yaml --out data/dataset --backbone-out data/backbone
        dvc repro data

Everything is fetched before anything is written, and every output is written under a temporary name and
renamed, so a failed run leaves the previous outputs or none. Downloads stay in downloads.dir, where a
dropped download resumes. The same seed, params and downloads give byte-identical files. Prints one summary
line (warnings, e.g. for unpinned downloads, go to stderr); a bad params file or input prints one
`error: ...` line and exits with 1.
"""
from __future__ import annotations

import argparse
import contextlib

from aladin.config import load_params
from aladin.io import atomic_path
from stages.common import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.data", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--backbone-out", default=None, help="initial backbone checkpoint folder to write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        coco = params.data.source == "coco"
        # Fetch first: a missing download must not leave a new dataset beside an old backbone.
        if coco:
            from aladin import coco as coco_source

            sources = coco_source.fetch_sources(params.downloads, params.data.coco_images)
        backbone_source = None
        if args.backbone_out is not None:
            from aladin import bert_init  # torch and transformers: imported only when a backbone is asked for

            backbone_source = bert_init.source_folder(params.backbone, params.downloads)
        # Both outputs are renamed into place only after both were written (the backbone's rename first).
        with contextlib.ExitStack() as stack:
            dataset = stack.enter_context(atomic_path(args.out, directory=True))
            if coco:
                counts = coco_source.write_dataset_files(dataset, sources)
            else:
                from aladin import synthetic_data

                counts = synthetic_data.write_dataset_files(dataset, params.data, params.seed)
            note = ""
            if args.backbone_out is not None:
                if params.backbone.init == "random":
                    if coco:
                        words = coco_source.vocabulary(dataset)
                    else:
                        from aladin import synthetic

                        words = synthetic.vocabulary()
                else:
                    words = ()
                folder = stack.enter_context(atomic_path(args.backbone_out, directory=True))
                what = bert_init.write_backbone_files(folder, params.backbone, backbone_source,
                                                      params.model.img_feature_dim, params.seed, words)
                note = f"; backbone ({what}) in {args.backbone_out}"
        single_1k = (f"test_img_keys_1k.tsv ({counts['single_1k']} of the test images)" if counts["single_1k"] else
                     "no test_img_keys_1k.tsv (downloads.vinvl_test_img_keys_1k has no URL)")
        if coco:
            images = f"{counts['linked']} images linked" if counts["linked"] else "no images (data.coco_images: false)"
            print(f"data: {counts['images']} COCO images ({counts['train'] + counts['restval']} train incl. "
                  f"{counts['restval']} restval, {counts['val']} val, {counts['test']} test), {counts['captions']} "
                  f"captions, {counts['objects']} objects, {images}, {single_1k} in {args.out}{note}")
        else:
            print(f"data: {counts['images']} images ({counts['train']} train, {counts['val']} val, "
                  f"{counts['test']} test), {counts['captions']} captions, {counts['objects']} objects, "
                  f"{single_1k} in {args.out}{note}")
        return 0

    return run(body)


if __name__ == "__main__":
    raise SystemExit(main())
