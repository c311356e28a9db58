"""Multi-file DICOM whole-slide images (VL Whole Slide Microscopy, tiled JPEG frames) written with
pydicom, for tests: one file per pyramid level plus a label image, all of one series."""
import os

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit, generate_uid

WHOLE_SLIDE_MICROSCOPY = '1.2.840.10008.5.1.4.1.1.77.1.6'


def jpeg_frames(rgb, tile):
    """JPEG bytes of each tile, row by row (TILED_FULL order), edge tiles padded with white."""
    height, width = rgb.shape[:2]
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = rgb[y:y + tile, x:x + tile]
            block[:part.shape[0], :part.shape[1]] = part
            ok, buf = cv2.imencode('.jpg', cv2.cvtColor(block, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            yield buf.tobytes()


def write_instance(path, rgb, uids, image_type, mpp, tile=256):
    """One DICOM instance of the series in uids (study, series, frame of reference)."""
    frames = list(jpeg_frames(rgb, tile))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WHOLE_SLIDE_MICROSCOPY
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = WHOLE_SLIDE_MICROSCOPY, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
    ds.Modality, ds.PatientID, ds.PatientName = 'SM', 'TEST', 'Test^Slide'
    ds.ImageType = image_type
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = rgb.shape[:2]
    ds.TotalPixelMatrixFocalPlanes = ds.NumberOfFocalPlanes = ds.NumberOfOpticalPaths = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, 'YBR_FULL_422', 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.NumberOfFrames = len(frames)
    ds.DimensionOrganizationType = 'TILED_FULL'
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = rgb.shape[1] * mpp / 1000, rgb.shape[0] * mpp / 1000
    ds.ImagedVolumeDepth = 0.001
    ds.LossyImageCompression = '01'
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [mpp / 1000, mpp / 1000], 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    optical_path = Dataset()
    optical_path.OpticalPathIdentifier = '1'
    ds.OpticalPathSequence = Sequence([optical_path])
    ds.PixelData = encapsulate(frames)
    ds['PixelData'].VR = 'OB'
    ds.save_as(path, enforce_file_format=True)


def write_dicom_slide(folder, rgb, mpp=0.25):
    """A DICOM WSI in three files of one series: levels 0 and 1 and a label image. Returns their paths."""
    os.makedirs(folder, exist_ok=True)
    uids = (generate_uid(), generate_uid(), generate_uid())
    half = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    label = np.full((128, 256, 3), 255, np.uint8)
    instances = [('level-0.dcm', rgb, ['ORIGINAL', 'PRIMARY', 'VOLUME', 'NONE'], mpp),
                 ('level-1.dcm', half, ['DERIVED', 'PRIMARY', 'VOLUME', 'RESAMPLED'], 2 * mpp),
                 ('label.dcm', label, ['ORIGINAL', 'PRIMARY', 'LABEL', 'NONE'], 0.1)]
    paths = []
    for name, image, image_type, pixel_mm in instances:
        paths.append(os.path.join(str(folder), name))
        write_instance(paths[-1], image, uids, image_type, pixel_mm)
    return paths


def series_uid(path):
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
