"""What a job leaves: the results table (results), experiment tracking (tracking), the HTML
report (report) and deployable exports (deploy)."""
