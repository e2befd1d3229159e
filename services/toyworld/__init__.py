"""The toy world (specs/toyworld.md): a generated probe dataset and models with known answers.

- `generator.generate`: a Broden-format directory (images, label PNGs, CSVs, captions).
- `world.WORLD`: its vocabulary (colours and RGB, shapes, parts, textures, scenes, label numbers).
- `toynet.load_toynet`: a small CNN trained on the scene labels, cached by content key.
- `planted.planted_model` / `planted.planted_units`: a model whose units are colour detectors
  by construction.
- `clip.load_toy_clip`: a tiny open_clip CLIP trained on toy phrases, cached by content key.
- `annotations.write_annotations`: MILANNOTATIONS-format data of concept-detector units.

The package imports none of its modules: `limits`, which the gateway's validation
reads, must not pull in torch or open_clip (an idle gateway stays light).
"""
