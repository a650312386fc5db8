// Over-regularization causes rank collapse: a 64-384-192-10 MLP on scikit-learn's digits, with
// an L2 penalty (AllenNLP `regularizer`, alpha * sum(W^2) added to the loss) on FC1's weight only.
// `run.py` trains a sweep by overriding, per run, the penalty strength
//   --overrides '{"model.regularizer.regexes.0.1.alpha": 0.01, "trainer.num_epochs": 10}'
// Train one run directly (from the repository root):
//   PYTHONPATH=examples allennlp train examples/l2_rank_collapse/config.jsonnet -s /tmp/l2run \
//     --include-package l2_rank_collapse --include-package allennlp_analyze.plugin
local seed = 2018;
{
  random_seed: seed,
  numpy_seed: seed,
  pytorch_seed: seed,
  dataset_reader: { type: "digits" },
  // The "paths" name the fixed stratified split of the bundled data set (no file, no download).
  train_data_path: "train",
  validation_data_path: "validation",
  model: {
    type: "digits_mlp",
    input_dim: 64,
    hidden1: 384,
    hidden2: 192,
    num_classes: 10,
    regularizer: {
      // FC1's weight (384 x 64) only: not its bias, and nothing in FC2 / FC3.
      regexes: [["^fc1\\.weight$", { type: "l2", alpha: 0.01 }]],
    },
  },
  data_loader: { batch_size: 32, shuffle: true },
  validation_data_loader: { batch_size: 450, shuffle: false },
  trainer: {
    num_epochs: 30,
    optimizer: { type: "sgd", lr: 0.05, momentum: 0.9 },
    // Linear decay of the learning rate to 0 over the run (per batch): a stable final epoch.
    learning_rate_scheduler: { type: "polynomial_decay", power: 1.0, end_learning_rate: 0.0 },
    validation_metric: "+accuracy",
    cuda_device: -1,
    callbacks: [
      {
        type: "weight_analysis",
        // FC1, FC2 and FC3 weights (FC3: 10 x 192); spectra by float64 SVD.
        match: ["^fc[123]\\.weight$"],
        every: 1,
      },
    ],
  },
}
