"""Front-ends for other frameworks and engines: one module per framework or engine, the only
module that imports it (``hf_trainer``: transformers' ``Trainer``; ``lightning``: Lightning;
``dask``: Dask distributed). Importing this package imports none of them."""
