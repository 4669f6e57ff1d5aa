"""Helpers shared by the test modules and the subprocess scripts: the optimiser table
(``optim_db``) and the Lightning models, data and Trainer settings (``trainer``)."""
