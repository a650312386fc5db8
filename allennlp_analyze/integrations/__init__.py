"""Front-ends for other frameworks and engines: one module per framework, the only module that
imports it (``hf_trainer``: transformers' ``Trainer``; ``lightning``: Lightning). Importing this
package imports none of them."""
