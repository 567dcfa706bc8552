"""photonfit.physics: the exact optical-detector simulator (no learned parts).

Units everywhere: metres (m), nanoseconds (ns), MeV, nanometres (nm) for wavelength.
This package imports nothing else of photonfit.
"""

__version__ = "0.1.0"
