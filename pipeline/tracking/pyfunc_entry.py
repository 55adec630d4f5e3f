"""MLflow models-from-code entry: the registered model is this file plus the policy folder, no pickle."""

import mlflow

from pipeline.tracking.pyfunc import StudentPolicyModel

mlflow.models.set_model(StudentPolicyModel())
