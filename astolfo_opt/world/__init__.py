"""The tiny trained world: SD1-layout models, a CLIP tower, an aesthetic head and a judge, all trained here on CPU.

Why: no public SD or CLIP weights can reach the machines this project is built and tested on, and random weights
render noise, so a search over them optimises nothing. The world is small enough to train in minutes on two cores
and real enough that merging has consequences: finetunes that gain and forget concepts, outliers that break a
uniform merge, a tower that measures prompt adherence, a head that measures image quality, and a judge the
optimiser never sees. ``astolfo-opt world build|check|judge``; the demo, the end-to-end tests and the search
benchmark run on it.

Modules: :mod:`.concepts` (what the world draws and says), :mod:`.vae` (the constructed autoencoder),
:mod:`.train` (diffusion models), :mod:`.scorer` (tower + head), :mod:`.judge`, :mod:`.build` (the folder and its
manifest), :mod:`.check` (the properties).
"""
