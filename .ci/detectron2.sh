#!/usr/bin/env bash
# Install detectron2 0.6 (Python code only, no compiled ops) from PyPI's pb1-detectron2 sdist,
# so the detectron2 detection backend is tested with real detectron2 code on any machine.
#
# Idempotent: does nothing when an importable detectron2 with its model-zoo configs is there
# (an official detectron2 install is left alone). What the patch changes, and why:
#   - no C++/CUDA extension (the sdist lacks its sources): ext_modules=[] and a detectron2/_C.py
#     stub whose ops raise; rotated-box ops, deformable conv and the fast COCO eval are then
#     unavailable (the detection plugin uses COCOEvaluator(use_fast_impl=False));
#   - the model-zoo yaml configs (shipped inside the package) are listed in package_data;
#   - Pillow 10 removed Image.LINEAR: use Image.BILINEAR; NumPy 1.24 removed np.bool: use bool;
#   - model_zoo.get_config_file without pkg_resources (gone from setuptools >= 81);
#   - black==21.4b2 dropped from install_requires (only LazyConfig.save imports it, lazily).
set -euo pipefail
PY=${PYTHON:-python3}

if "$PY" - <<'EOF' 2>/dev/null
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("detectron2")
zoo = importlib.util.find_spec("detectron2.model_zoo")
ok = spec is not None and zoo is not None and any(
    (pathlib.Path(p) / "configs" / "Base-RCNN-FPN.yaml").is_file()
    for p in zoo.submodule_search_locations)
sys.exit(0 if ok else 1)
EOF
then
    echo "detectron2: already installed"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-build-isolation pb1-detectron2==0.6 -d "$work"
tar -xzf "$work"/pb1-detectron2-0.6.tar.gz -C "$work"
src="$work/pb1-detectron2-0.6"

"$PY" - "$src" <<'EOF'
import pathlib, re, sys

src = pathlib.Path(sys.argv[1])


def patch(rel: str, old: str, new: str, count: int = 1) -> None:
    path = src / rel
    text = path.read_text()
    if text.count(old) < count:
        sys.exit(f"detectron2.sh: {rel}: expected text not found: {old!r}")
    path.write_text(text.replace(old, new))


patch("setup.py", "ext_modules=get_extensions(),", "ext_modules=[],")
patch("setup.py", 'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
      'package_data={"detectron2.model_zoo": ["configs/*.yaml", "configs/**/*.yaml", '
      '"configs/**/*.py"]},')
patch("setup.py", '"black==21.4b2",', "")
patch("detectron2/data/transforms/transform.py", "Image.LINEAR", "Image.BILINEAR")
for rel in ("detectron2/evaluation/pascal_voc_evaluation.py", "detectron2/structures/masks.py"):
    path = src / rel
    path.write_text(re.sub(r"\bnp\.bool\b(?!_)", "bool", path.read_text()))
patch("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "")
patch("detectron2/model_zoo/model_zoo.py",
      'pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
      'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)')
(src / "detectron2" / "_C.py").write_text(
    '"""Stand-in for the compiled ops, which this build leaves out."""\n\n\n'
    "def __getattr__(name):\n"
    "    raise NotImplementedError(\n"
    '        f"detectron2._C.{name}: this detectron2 was built without its C++/CUDA ops "\n'
    '        "(rotated boxes, deformable conv, fast COCO eval are unavailable)")\n')
EOF

"$PY" -m pip install -q --no-build-isolation "$src"
"$PY" -c "import detectron2, detectron2.model_zoo; print('detectron2', detectron2.__version__, 'installed')"
