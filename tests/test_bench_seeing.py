"""bench/seeing.py's --shapes: overrides of the small preset, and a typo refused before any run."""
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import seeing
from iqa_spider.model.tiny import PRESETS


def test_a_shape_overrides_only_the_fields_it_names():
    assert seeing.parse_shape("small") == PRESETS["small"]
    shape = seeing.parse_shape("vision_patch=7, vision_hidden=256")
    assert (shape.vision_patch, shape.vision_hidden) == (7, 256)
    assert shape.text_hidden == PRESETS["small"].text_hidden


@pytest.mark.parametrize("bad", ["vision_width=256", "vision_patch", "vision_patch=seven"])
def test_a_bad_shape_is_refused(bad):
    with pytest.raises(ValueError):
        seeing.parse_shape(bad)


def test_the_cli_refuses_a_bad_shape_before_building_anything():
    run = subprocess.run([sys.executable, str(REPO / "bench/seeing.py"), "--shapes", "small;depth=2", "--no-record"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--shapes" in run.stderr, run.stderr
