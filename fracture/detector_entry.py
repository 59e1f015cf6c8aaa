"""Entry file for MLflow's models-from-code logging of the fracture detector (see :mod:`fracture.pyfunc_entry`)."""

from mlflow.models import set_model

from fracture.detector_serving import DetectorPyfunc

set_model(DetectorPyfunc())
