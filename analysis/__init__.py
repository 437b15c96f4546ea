"""analysis: reads MLflow runs into pandas, fits scaling laws and draws the plots; never trains."""
