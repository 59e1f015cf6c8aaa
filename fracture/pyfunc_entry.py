"""Entry file for MLflow's models-from-code logging: MLflow executes it to build the model.

Kept apart from :mod:`fracture.serving` because ``set_model`` registers the instance when the
file runs, which no ordinary module of this package does.
"""

from mlflow.models import set_model

from fracture.serving import FracturePyfunc

set_model(FracturePyfunc())
