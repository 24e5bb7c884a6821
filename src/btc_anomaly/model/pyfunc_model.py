"""Model code MLflow stores with each version and executes when ``mlflow.pyfunc.load_model`` or
``mlflow models serve`` loads it (models from code). btc-anomaly's own loaders never run it
(``registry.load_version`` reads the bundle as data)."""

from mlflow.models import set_model

from btc_anomaly.model.pyfunc import BundlePyfunc

set_model(BundlePyfunc())
