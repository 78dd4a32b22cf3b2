"""Each extension point is one table; the schema, which sits below the code it names, lists the same names."""
import typing

from pipeline.classify.prepare import SOURCES
from pipeline.config import DataConfig, SweepConfig
from pipeline.config.deploy import LATENCY_BACKENDS
from pipeline.deploy.backends import BACKENDS


def _literal_names(annotation) -> set[str]:
    names = set()
    for arg in typing.get_args(annotation):
        names |= {arg} if isinstance(arg, str) else _literal_names(arg)
    return names


def test_latency_backends_are_the_registry():
    assert set(LATENCY_BACKENDS) == set(BACKENDS)


def test_the_sweep_times_on_registered_backends_that_need_no_export():
    names = _literal_names(SweepConfig.model_fields["latency"].annotation.model_fields["backend"].annotation)
    assert names == {"torch", "onnxruntime"} and names <= set(BACKENDS)
    assert not any(BACKENDS[n].macos for n in names)


def test_data_sources_are_the_registry():
    assert _literal_names(DataConfig.model_fields["source"].annotation) == set(SOURCES)
