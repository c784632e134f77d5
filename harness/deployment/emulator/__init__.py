"""The XDNA 2 numerics emulator: the default device under test (``harness.deployment.emulator:factory``)."""
from harness.deployment.emulator.config import EmulatorConfig
from harness.deployment.emulator.faults import FAULTS, Deviations, Fault
from harness.deployment.emulator.model import Emulator, make_factory

factory = make_factory()
factory.__doc__ = "The clean emulator: ``factory(spec, weights) -> Emulator`` with default knobs and no faults."

__all__ = ["Deviations", "Emulator", "EmulatorConfig", "FAULTS", "Fault", "factory", "make_factory"]
