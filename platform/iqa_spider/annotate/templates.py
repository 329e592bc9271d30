"""Question pools and phrasing for every task.

Pools are plain data so that reviewers can read them in one place. Answers vary in their
wording (a seeded choice per sample) but every slot is filled from the truth: the words
that carry meaning (distortion, severity, position, level) are never paraphrased here.
"""
from __future__ import annotations

# 26 global-description questions, as many as the paper's pool.
GLOBAL_QUESTIONS = (
    "Assess the quality of the image with a detailed explanation.",
    "Evaluate the quality of this image and explain your reasoning.",
    "How is the quality of this image? Please explain in detail.",
    "Describe the quality of the image and the distortions in it.",
    "Give a detailed assessment of this image's visual quality.",
    "What is the overall quality of this image? Explain why.",
    "Analyse the image quality, naming any distortions and where they are.",
    "Could you rate and explain the quality of this picture?",
    "Please describe the visual quality of the image in detail.",
    "Examine this image and describe any quality problems you see.",
    "What can you say about the quality of this image?",
    "Provide a thorough quality evaluation of this photo.",
    "Judge the quality of the image and justify your judgement.",
    "Describe the distortions of this image and their effect on quality.",
    "Inspect the image carefully and report on its quality.",
    "How would you describe the quality of this image, and why?",
    "Is this image of high quality? Explain in detail.",
    "Comment on the technical quality of this image.",
    "Explain the quality of the image, region by region.",
    "What quality issues does this image have, if any?",
    "Write a detailed quality report for this image.",
    "Evaluate the perceptual quality of the image with reasons.",
    "Tell me about the quality of this picture in detail.",
    "Assess this image for distortions and overall quality.",
    "Give your expert opinion on the quality of this image.",
    "Describe how good or bad this image looks, with explanations.",
)

LOCAL_QUESTIONS = (
    "Provide a careful evaluation of {region}.",
    "How is the quality of {region}?",
    "Describe the quality of {region}.",
    "Assess the visual quality of {region} in detail.",
    "What can you say about the quality of {region}?",
    "Evaluate {region} and describe any distortion in it.",
)

HYD_QUESTIONS = (
    "Which is the most degraded region in the image?",
    "Where is the worst quality in the image?",
    "Which region of the image is the most distorted?",
    "Point out the region with the most severe degradation.",
)

SID_QUESTIONS = (
    "Which region shows the most severe {distortion}?",
    "Where is the {distortion} in the image?",
    "Which part of the image is affected by {distortion}?",
    "Locate the region with the strongest {distortion}.",
)

DAO_QUESTIONS = (
    "Which region shows {first} added before {second}?",
    "Where was {first} applied and then {second}?",
    "Which region has {first} followed by {second}?",
)

REFER_QUESTIONS = (
    "What distortions affect {region}?",
    "Which distortions can be seen in {region}?",
    "What is wrong with the quality of {region}?",
    "List the distortions in {region}.",
)

# referring_long asks for the effects too: its answers (writers.long_list) say what each
# distortion does to the region, so the question must ask for that, not only for names.
REFER_LONG_QUESTIONS = (
    "What distortions affect {region}, and how do they change its appearance?",
    "Describe the distortions in {region} and their effect on it.",
    "Which distortions can be seen in {region}, and what do they do to it?",
)

GROUND_ANSWERS = (
    "The {what} is {region}.",
    "The {what} is located at {region}.",
    "It is {region}.",
)

WHOLE_IMAGE_ANSWERS = (
    "The whole image is affected by {distortions}.",
    "The entire image is degraded by {distortions}.",
)

GLOBAL_OPENINGS_CLEAN = (
    "The image is clean and sharp, with no visible distortion.",
    "No distortion can be seen in this image; details and colours look natural.",
    "This image shows no visible distortion, and its textures are well preserved.",
)

DISTORTION_SENTENCES = (
    "{Severity} {term} appears in {region}, {effect}.",
    "{region_cap} shows {severity} {term}, {effect}.",
    "There is {severity} {term} in {region}, {effect}.",
)

CLOSINGS = (
    "Overall, the quality of the image is {level}.",
)

# What each distortion does to what a viewer sees, for long referring and descriptions.
EFFECTS = {
    "blur": "which softens edges and hides fine texture",
    "noise": "which adds grainy speckles over the surface",
    "compression": "which causes blocky artifacts and ringing around edges",
    "brighten": "which washes out highlights and lowers contrast",
    "darken": "which hides detail in the shadows",
    "contrast_strengthen": "which clips shadows and highlights",
    "contrast_weaken": "which makes the content look flat and hazy",
    "saturate_strengthen": "which makes the colours look unnaturally vivid",
    "saturate_weaken": "which makes the colours look dull and faded",
    "oversharpen": "which creates halos along edges",
    "pixelate": "which turns details into visible blocks",
    "quantization": "which causes banding in smooth gradients",
}
