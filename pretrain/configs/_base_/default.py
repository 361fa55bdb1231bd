# Pre-training config schema (mmengine config; every key can be changed with --set a.b=value).
#
# model:    name = a pretrain registry entry (mae_vit_tiny_patch4_32, robust_mae_<preset>, ddae_<preset>,
#           mae+dds_<preset>, mae_vit_base_patch16, ...); every other key is a constructor argument of that
#           model (official MAE arguments plus the technique's knobs, see docs/techniques.md).
# technique: name recorded in the encoder file (mae, robust-mae, ddae, mae+dds).
# data:     img_size = training resolution; num_workers = loader processes for image folders (the built-in
#           Fashion-MNIST pipeline runs batched in the main process); limit = use only the first n training
#           images (None = all; for smoke tests); max_bad_fraction = largest fraction of broken image files
#           (empty, truncated, not an image) skipped before the run refuses to start. The dataset itself is --data.
# optim:    AdamW. lr = blr * eff_batch / 256 with eff_batch = batch_size * accum_iter * processes;
#           eff_batch_size (optional) fixes the effective batch and derives accum_iter from the process count.
#           weight_decay applies to weight matrices only (1-D params and model.no_weight_decay() excluded).
#           clip_grad = max global gradient norm or None.
# schedule: epochs, warmup_epochs (linear from 0), min_lr (end of the half cosine); stepped per optimizer step.
# runtime:  seed, ckpt_every (keep checkpoint-<epoch>.pt every n epochs; checkpoint-latest.pt always),
#           ckpt_every_steps (also rewrite checkpoint-latest.pt every n optimizer steps inside an epoch,
#           holding the data position, so a pre-empted run loses at most n steps; 0 = epoch ends only),
#           log_every (optimizer steps between log.jsonl lines), mask_ratio, amp ("auto" = bf16 on CUDA and on
#           CPUs with native bf16, fp32 elsewhere | "bf16" | "fp16" | "none"), compile (torch.compile the model,
#           static shapes; pays a one-off compilation of tens of seconds), progress (tqdm bar on a terminal, plain
#           log lines otherwise), tensorboard (also log scalars to <out>/tensorboard; needs the tensorboard package).
technique = "mae"
model = dict(name="mae_vit_base_patch16")
data = dict(img_size=224, num_workers=10, limit=None, max_bad_fraction=0.001)
optim = dict(blr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95), batch_size=64, accum_iter=1,
             eff_batch_size=None, clip_grad=None)
schedule = dict(epochs=400, warmup_epochs=40, min_lr=0.0)
runtime = dict(seed=0, ckpt_every=20, ckpt_every_steps=0, log_every=20, mask_ratio=0.75, amp="auto", compile=False,
               progress=True, tensorboard=False)
