"""The stages, one module each, in pipeline order (runtime/registry.py holds their records):

    prepare            slides / patch folders / labels CSV -> a dataset directory
    train_autoencoder  the KL autoencoder on unlabeled tiles
    encode             cache latents (posterior mean, std) of a dataset
    pretrain           the unconditional latent diffusion UNet
    export_base        pretrain's model -> a shippable base
    latent_classifier  the noise-aware latent classifier p(y | z_t, t)
    finetune_decoder   the decoder fine-tune with an auxiliary classifier
    sample             classifier-guided synthesis in latent space
    select             score the samples, write the keep-list
    evaluate           downstream classifiers, real vs real + synthetic (and `score`: re-scoring them)
    judge              the independent class-fidelity judge
    report             the HTML + Markdown report of a run (a package: its sections)

Each module has `run(config)`. A stage imports no other stage: what two stages share lives in core/, data/,
models/ or runtime/.
"""
