"""Each detector's ``Settings`` (what the config builds) is the settings type it declares as Detector[S]."""

from __future__ import annotations

import typing

import pytest
from trainhealth.config import default_detector_settings
from trainhealth.detectors import ALL, Detector


def declared_settings(cls: type) -> type:
    """S of the nearest ``Detector[S]`` among the class's bases."""
    for klass in cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            if typing.get_origin(base) is Detector:
                (arg,) = typing.get_args(base)
                return arg
    raise AssertionError(f"{cls.__name__} does not subclass Detector[Settings]")


@pytest.mark.parametrize("detector", ALL, ids=lambda d: d.name)
def test_settings_class_is_the_declared_settings_type(detector: type[Detector[object]]) -> None:
    assert issubclass(detector.Settings, declared_settings(detector))
    assert isinstance(default_detector_settings()[detector.name], declared_settings(detector))
