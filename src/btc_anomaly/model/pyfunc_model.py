"""Model code MLflow stores with each version and executes on load (models from code)."""

from mlflow.models import set_model

from btc_anomaly.model.pyfunc import BundlePyfunc

set_model(BundlePyfunc())
