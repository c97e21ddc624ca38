"""What a TEE will report for a launch, computed from the runtime profile (no TEE needed).

Modules: ``ovmf`` (the firmware's footer table, SEV and TDVF metadata), ``vmsa`` (initial vCPU
state and CPU model signatures), ``amd`` (SEV, SEV-ES, SEV-SNP launch digests), ``tdx``
(MRTD), ``launch`` (the inputs, read back from the launch's own QEMU command line, and
:func:`measure`), ``report`` (text, JSON, RVPS reference values). Pure: files in, values out.
"""

from hypervisor.measure.errors import MeasureError
from hypervisor.measure.launch import LaunchInputs, Measurement, Value, launch_inputs, measure

__all__ = ["LaunchInputs", "MeasureError", "Measurement", "Value", "launch_inputs", "measure"]
